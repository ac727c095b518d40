"""``mtl generate`` on damaged transformers directories and on run folders: one error line, or the run's checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mtl.cli import main
from mtl.models.lm.hf import load_hf_checkpoint, save_hf_checkpoint
from mtl.models.lm.transformer import TransformerLM
from tests.models.lm.test_generate_cli import _greedy_ids, _lm_checkpoint


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def hf_dir(build_preset: Callable[..., TransformerLM], tmp_path: Path) -> Path:
    lm = build_preset("lm_mixtral", vocab_size=300, max_seq_len=16, tie_embeddings=False)
    return save_hf_checkpoint(lm, tmp_path / "hf", model_type="mixtral")


def _one_error_line(rc: int, out: str, err: str) -> str:
    assert rc == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("error:"), err
    return err


def test_truncated_safetensors_names_the_file(
    hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _one_error_line(*_run(capsys, str(hf_dir), "--prompt", "x"))
    assert str(weights) in err and "not a readable safetensors file" in err


def test_config_that_is_not_json_names_the_file(
    hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (hf_dir / "config.json").write_text("{not json")
    err = _one_error_line(*_run(capsys, str(hf_dir), "--prompt", "x"))
    assert str(hf_dir / "config.json") in err and "not valid JSON" in err


def test_config_that_is_a_json_list_names_the_file(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list"):
        load_hf_checkpoint(hf_dir)


def test_index_without_weight_map_names_the_file(hf_dir: Path) -> None:
    index = hf_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index\.json: no 'weight_map'"):
        load_hf_checkpoint(hf_dir)


def test_index_that_is_not_json_names_the_file(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        load_hf_checkpoint(hf_dir)


def test_run_folder_generates_from_its_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt, module = _lm_checkpoint(run / "checkpoints" / "last.ckpt")
    prompt = "abc"
    rc, out, err = _run(
        capsys, str(run), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"
    )
    assert rc == 0, err
    assert str(ckpt) in err  # says which file it read
    ids = module.tokenizer.encode(prompt).tolist()
    expected = _greedy_ids(module.net, ids, 6, 12)
    assert out.rstrip("\n") == module.tokenizer.decode(torch.tensor(expected))


def test_folder_without_config_or_checkpoint_names_both_forms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_error_line(*_run(capsys, str(tmp_path), "--prompt", "x"))
    assert "checkpoints/last.ckpt" in err and "config.json" in err and "run folder" in err
