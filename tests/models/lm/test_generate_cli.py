"""``mtl generate``: sampling from an LM checkpoint or a transformers directory from the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from mtl.cli import main
from mtl.data.tokenizers import CharTokenizer
from mtl.training.build import build, build_lm
from mtl.training.lm_module import LMModule
from mtl.training.rec_module import RecModule

MODEL: dict[str, Any] = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 32,
    "max_seq_len": 12,
    "moe": {
        "_target_": "mtl.models.lm.MoEFFN",
        "num_experts": 4,
        "gate": {"_target_": "mtl.moe.TopKGate", "_partial_": True, "k": 2},
        "experts": {"_target_": "mtl.moe.SwiGLUExperts", "_partial_": True, "d_hidden": 16},
    },
}


def _save(module: pl.LightningModule, path: Path) -> Path:
    """A checkpoint written as Lightning writes one (state, hyper-parameters, tokenizer)."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _lm_checkpoint(path: Path, scale: float = 20.0) -> tuple[Path, LMModule]:
    tok = CharTokenizer.fit("abcdefgh ")
    config = {**MODEL, "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    net = build_lm(config, vocab_size=tok.vocab_size)
    with torch.no_grad():  # larger weights: a greedy path that is not one repeated token
        for p in net.parameters():
            p.mul_(scale)
    module = LMModule(net=net, tokenizer=tok, net_config=config)
    return _save(module, path), module


def _greedy_ids(model: Any, ids: list[int], n: int, max_len: int) -> list[int]:
    """The reference: argmax of the last position, appended, n times (context cropped)."""
    model.eval()
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out[-max_len:]])).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_greedy_from_checkpoint_equals_argmax_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, module = _lm_checkpoint(tmp_path / "lm.ckpt")
    tok = module.tokenizer
    assert tok is not None
    prompt = "abc ha"
    rc, out, err = _run(
        capsys, str(ckpt), "--prompt", prompt, "--max-new-tokens", "15", "--temperature", "0"
    )
    assert rc == 0, err
    expected = tok.decode(_greedy_ids(module.net, tok.encode(prompt).tolist(), 15, 12))
    assert out.rstrip("\n") == expected
    assert len(set(expected[len(prompt) :])) > 1  # not a degenerate constant continuation


def test_sampling_is_reproducible_with_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _lm_checkpoint(tmp_path / "lm.ckpt", scale=1.0)  # a flat distribution
    args = (str(ckpt), "--prompt", "ab", "--max-new-tokens", "20", "--top-k", "3")
    outs = [_run(capsys, *args, "--seed", str(s))[1] for s in (1, 1, 2)]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_greedy_from_transformers_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transformers directory without tokenizer.json: bytes; equals transformers' own argmax loop."""
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        pytest.importorskip("transformers")
    from mtl.models.lm.hf.tiny import tiny_hf_model

    model = tiny_hf_model("qwen2_moe", vocab_size=260)
    model.save_pretrained(tmp_path)
    prompt = "MoE!"
    rc, out, err = _run(
        capsys, str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"
    )
    assert rc == 0, err
    ids = _greedy_ids(model, list(prompt.encode()), 8, 64)
    expected = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    assert out.rstrip("\n") == expected


def test_missing_path_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, str(tmp_path / "nope.ckpt"), "--prompt", "a")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error:") and "nope.ckpt does not exist" in err


def test_ranker_checkpoint_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec

    spec = FeatureSpec(
        categorical=[CategoricalFeature("item", 10, 4)],
        numeric=[],
        tasks=[TaskSpec("click", "binary")],
    )
    net_config = {
        "_target_": "mtl.models.rec.ranker.Ranker",
        "embedding": {
            "_target_": "mtl.models.rec.embedding.FeatureEmbedding",
            "spec": {"_target_": "mtl.data.spec.FeatureSpec.from_dict", "data": spec.to_dict()},
        },
        "model": {
            "_target_": "mtl.models.rec.MMoE",
            "num_experts": 2,
            "expert_hidden": [8],
            "d_in": 4,
            "tasks": spec.task_names,
        },
    }
    ckpt = _save(
        RecModule(net=build(net_config, what="net"), net_config=net_config), tmp_path / "rec.ckpt"
    )
    rc, out, err = _run(capsys, str(ckpt), "--prompt", "a")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error:") and "not of a language model" in err


def test_not_a_checkpoint_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    rc, _, err = _run(capsys, str(junk), "--prompt", "a")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:")


def test_transformers_directory_uses_its_tokenizer_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        pytest.importorskip("transformers")
    import tokenizers

    from mtl.models.lm.hf.tiny import tiny_hf_model

    model = tiny_hf_model("deepseek_v3")  # 97 tokens: too few for bytes
    model.save_pretrained(tmp_path)
    rc, _, err = _run(capsys, str(tmp_path), "--prompt", "a b")
    assert rc == 2 and "no tokenizer.json" in err
    vocab = {f"w{i}": i for i in range(97)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rc, out, err = _run(
        capsys,
        str(tmp_path),
        "--prompt",
        "w5 w17 w3",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    )
    assert rc == 0, err
    ids = _greedy_ids(model, [5, 17, 3], 6, 64)
    assert out.rstrip("\n") == tok.decode(ids, skip_special_tokens=False)
