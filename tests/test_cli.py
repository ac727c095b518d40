"""The `mtl` command line: help, list, config composition and clean errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtl.cli import TOOLS, main
from mtl.training.config import conf_dir


def test_console_script_help() -> None:
    exe = shutil.which("mtl")
    cmd = [exe] if exe else [sys.executable, "-m", "mtl.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("train", "compare", "list", "experiment=census_home"):
        assert word in proc.stdout


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: mtl" in capsys.readouterr().out


def test_list_shows_models_data_and_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "mmoe",
        "home",
        "ple",
        "shared_bottom",
        "census_income",
        "synthetic_ctr",
        "census_home",
        "cpu",
    ):
        assert name in out


def test_print_config_applies_experiment_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "train",
            "--print-config",
            "experiment=census_home",
            "trainer.max_epochs=1",
            "model.num_shared_experts=2",
            "output_dir=somewhere",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "model_name: home" in out and "_target_: mtl.models.rec.HoME" in out
    assert "num_shared_experts: 2" in out and "max_epochs: 1" in out
    assert "source: census_income" in out and "output_dir: somewhere" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "model=mmoe2"], "error: unknown model 'mmoe2'; available model configs: "),
        (["train", "data=criteo"], "error: unknown data 'criteo'; available data configs: "),
        (
            ["train", "experiment=nope"],
            "error: unknown experiment 'nope'; available experiment configs: ",
        ),
        (
            ["train", "trainer.max_epoch=3"],
            "error: could not compose config 'train': Could not override",
        ),
        (["compare", "models=[home,xgboost]"], "error: unknown model 'xgboost'"),
        (["train", "model=mmoe", "model.bogus=1"], "error: could not compose config 'train': "),
        (["train", "callbacks=nope"], "error: unknown callbacks 'nope'"),
        (
            ["compare", "model.lora_rnk=4"],
            "error: overrides ['model.lora_rnk=4'] match no key of the model configs",
        ),
    ],
)
def test_unknown_names_give_one_line_errors(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
    if "unknown model" in expected:
        assert "mmoe" in err and "home" in err


def test_argument_a_model_does_not_take_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            "model=mmoe",
            "+model.bogus=1",
            "data.source_kwargs.n=2000",
            f"output_dir={tmp_path}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not build model (mtl.models.rec.MMoE): ")
    assert "bogus" in err and err.count("\n") == 1


def test_data_validation_error_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            "data=census_income",
            f"data.path={tmp_path / 'missing.gz'}",
            f"output_dir={tmp_path}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.gz" in err and err.count("\n") == 1


def test_conf_dir_can_be_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(conf_dir(), tmp_path / "conf")
    (tmp_path / "conf" / "model" / "tiny_mmoe.yaml").write_text(
        "_target_: mtl.models.rec.MMoE\nnum_experts: 2\nexpert_hidden: [4]\n"
    )
    monkeypatch.setenv("MTL_CONF_DIR", str(tmp_path / "conf"))
    assert main(["list"]) == 0
    assert "tiny_mmoe" in capsys.readouterr().out
    assert main(["train", "--print-config", "model=tiny_mmoe"]) == 0
    assert "num_experts: 2" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_shows_its_own_help(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([tool, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mtl {tool}")


def test_a_tool_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    TOOLS["failing"] = ("ipaddress:ip_address", "a tool that refuses its argument")
    try:
        assert main(["failing", "not an address"]) == 2
    finally:
        del TOOLS["failing"]
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("override", "quoted"),
    [
        ("data.categorical=[user_id,artículo]", 'data.categorical=[user_id,"artículo"]'),
        ("data.categorical=[user_id, artículo]", 'data.categorical=[user_id,"artículo"]'),
        ("data.path=/tmp/dätä.csv", 'data.path="/tmp/dätä.csv"'),
    ],
)
def test_an_override_hydra_cannot_lex_gets_its_quoted_form(
    override: str, quoted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--print-config", "data=table", override]) == 2
    err = capsys.readouterr().err
    hint = f"; quote names with spaces or non-ASCII characters: '{quoted}'\n"
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith(hint)
    # The form the hint gives is one Hydra takes.
    assert main(["train", "--print-config", "data=table", quoted]) == 0
    assert ("artículo" if "artículo" in quoted else "/tmp/dätä.csv") in capsys.readouterr().out


def test_other_override_errors_get_no_quoting_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "data=table", "data.categorical=[a,b"]) == 2
    err = capsys.readouterr().err
    assert "override_grammar" in err and "quote names" not in err
