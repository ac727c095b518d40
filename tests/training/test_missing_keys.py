"""A required ``???`` key left unset ends in one ``error:`` line naming it, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtl.cli import main
from mtl.training.config import unset_keys


@pytest.mark.parametrize("experiment", ["lm_lora", "lm_extend_vocab"])
def test_unset_checkpoint_is_one_line_with_an_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], experiment: str
) -> None:
    out = tmp_path / "run"
    assert main(["train", f"experiment={experiment}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "model.checkpoint=runs/x/checkpoints/last.ckpt" in err, err
    # data.tokenizer.checkpoint of lm_extend_vocab only interpolates model.checkpoint
    assert err.count("model.checkpoint") == 2 and "data.tokenizer" not in err, err
    assert not out.exists()


def test_unset_keys_walks_lists_and_skips_interpolations() -> None:
    cfg = OmegaConf.create(
        {"b": "???", "a": {"x": "${b}", "y": 1, "l": [1, "???", {"z": "???"}]}, "c": "${a.x}"}
    )
    assert unset_keys(cfg) == ["a.l[1]", "a.l[2].z", "b"]
    assert unset_keys(OmegaConf.create({"a": [1], "b": {"c": None}})) == []


def test_print_config_shows_a_config_that_still_has_keys_to_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--print-config", "experiment=lm_lora"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint: ???" in out
    assert out.rstrip().endswith("# to set before a run: model.checkpoint")
