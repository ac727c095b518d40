"""Bad config values end in one ``error: ...`` line naming the key, exit status 2, and
nothing written, instead of a traceback or a run that reports a meaningless result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtl.cli import main
from mtl.training.config import ConfigError, compose_config
from mtl.training.train import train

SMALL = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=50",
    "data.source_kwargs.n_items=30",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=abc", r"seed must be an integer, got 'abc'"),
        ("data.batch_size=abc", r"data.batch_size must be an integer >= 1, got 'abc'"),
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
        ("optim.lr=0", r"optim.lr must be a finite number > 0, got 0"),
        ("optim.lr=-0.001", r"optim.lr must be a finite number > 0, got -0.001"),
        ("+task_weights.click=-1", r"task_weights.click must be a finite number >= 0, got -1"),
        ("data.task_weights={click: -0.5}", r"data.task_weights.click must be .* got -0.5"),
        ("trainer.precision=bf16-true", r"trainer.precision='bf16-true' is not supported"),
        ("trainer.precision=16-true", r"use one of 32-true, 64-true, bf16-mixed, 16-mixed"),
    ],
)
def test_bad_train_values_name_their_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", *SMALL, override, f"output_dir={out}"])
    assert re.search(expected, err), err
    assert not out.exists()  # refused before the run folder is touched


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed", "32", "bf16"])
def test_supported_rec_precisions_pass_the_check(precision: str) -> None:
    from mtl.training.config_checks import check_train_config

    check_train_config(compose_config("train", [f"trainer.precision={precision}"]))


def test_lm_precision_is_not_restricted() -> None:
    from mtl.training.config_checks import check_train_config

    cfg = compose_config("train", ["experiment=lm_dense", "trainer.precision=bf16-true"])
    check_train_config(cfg)


def test_train_refuses_before_touching_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_config("train", [*SMALL, "optim.lr=0", f"output_dir={out}"])
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train(cfg)
    assert not out.exists()


def test_a_loader_type_error_is_one_line_naming_the_data_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line_error(
        capsys, ["train", *SMALL, "+data.source_kwargs.bogus=1", f"output_dir={tmp_path / 'r'}"]
    )
    assert err.startswith("error: data: ") and "'bogus'" in err
    assert "check the data.* settings" in err


def test_group_errors_keep_the_cause_and_pass_other_errors_through() -> None:
    from mtl.training.config_checks import config_group_errors

    with pytest.raises(ConfigError, match=r"^model: boom") as err, config_group_errors("model"):
        raise TypeError("boom")
    assert isinstance(err.value.__cause__, TypeError)  # MTL_DEBUG=1 shows where
    with pytest.raises(KeyError), config_group_errors("data"):
        raise KeyError("a bug, not a config error")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("models=[mmoe,mmoe]", r"models lists mmoe twice"),
        ("seeds=[1,1]", r"seeds lists 1 twice"),
        ("seeds=[1,a]", r"seeds must be integers, got 'a'"),
    ],
)
def test_compare_refuses_duplicate_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    out = tmp_path / "cmp"
    base = ["compare", *SMALL, "models=[mmoe]", "seeds=1"]
    err = _one_line_error(capsys, [*base, override, f"output_dir={out}"])
    assert re.search(expected, err), err
    assert not out.exists()
