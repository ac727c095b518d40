"""Fair sizes for ``mtl compare``: parameter counts recorded, widths matched within 5%."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mtl.cli import main
from mtl.training.build import DataModule, build_datamodule
from mtl.training.config import ConfigError, compose_config
from mtl.training.param_match import (
    TOLERANCE,
    count_params,
    fair_sizes,
    match_widths,
    scale_widths,
)

TINY = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=50",
    "data.source_kwargs.n_items=30",
    "data.batch_size=256",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _configs(*models: str) -> dict[str, DictConfig]:
    return {name: compose_config("train", [*TINY, f"model={name}"]) for name in models}


@pytest.fixture(scope="module")
def dm() -> DataModule:
    return build_datamodule(compose_config("train", TINY))


def test_scaled_widths_are_integers_of_at_least_one() -> None:
    model = {"expert_hidden": [256, 128], "tower_hidden": [2], "lora_rank": 64, "num_experts": 4}
    assert scale_widths(model, 0.1) == {
        "expert_hidden": [26, 13],
        "tower_hidden": [1],
        "lora_rank": 6,
    }
    assert scale_widths(model, 1.0) == {
        k: model[k] for k in ("expert_hidden", "tower_hidden", "lora_rank")
    }


def test_matched_models_are_within_five_percent_of_the_first(dm: DataModule) -> None:
    configs = _configs("mmoe", "home", "ple", "shared_bottom")
    before = {name: count_params(cfg, dm) for name, cfg in configs.items()}
    # The presets differ by far more than 5%: the matching has work to do.
    assert max(before.values()) > 1.5 * min(before.values())
    sizes = fair_sizes(configs, dm, match=True)
    target = before["mmoe"]
    assert sizes["mmoe"]["params"] == target and sizes["mmoe"]["widths"] == {}
    for name, size in sizes.items():
        assert abs(size["params"] - target) <= TOLERANCE * target, (name, size["params"], target)
        # The recorded count is the real count of the network the recorded config builds.
        cfg = configs[name].copy()
        cfg.model = size["config"]
        assert count_params(cfg, dm) == size["params"]
    # Widths actually changed, and the expert counts did not.
    home = sizes["home"]
    assert home["sizes"]["expert_hidden"] != [256] and home["scale"] != 1.0
    assert home["sizes"]["lora_rank"] != 64 and home["sizes"]["num_shared_experts"] == 4
    assert sizes["ple"]["sizes"]["expert_hidden"] != [256, 128]


def test_match_params_to_scales_every_model_to_the_given_count(dm: DataModule) -> None:
    sizes = fair_sizes(_configs("mmoe", "home"), dm, match=True, match_to=20_000)
    for size in sizes.values():
        assert abs(size["params"] - 20_000) <= TOLERANCE * 20_000
        assert size["scale"] != 1.0


def test_without_match_the_counts_and_sizes_are_recorded_unchanged(dm: DataModule) -> None:
    configs = _configs("mmoe", "home")
    sizes = fair_sizes(configs, dm)
    assert sizes["mmoe"]["sizes"] == {
        "num_experts": 8,
        "expert_hidden": [256, 128],
        "tower_hidden": [64],
    }
    assert sizes["home"]["params"] == count_params(configs["home"], dm)
    assert all(s["scale"] == 1.0 and s["widths"] == {} for s in sizes.values())


def test_an_unreachable_count_is_refused_in_one_line(dm: DataModule) -> None:
    # With every width at 1, MMoE's 8 experts and gates still hold far more than 10 parameters.
    with pytest.raises(ConfigError) as info:
        match_widths(_configs("mmoe")["mmoe"], dm, 10, name="mmoe")
    message = str(info.value)
    assert "\n" not in message and "'mmoe'" in message and "10 parameters within 5%" in message


def test_compare_with_match_params_records_counts_and_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "models=[mmoe,home]",
            "seeds=1",
            *TINY,
            "model.expert_hidden=[16]",
            "model.tower_hidden=[8]",
            "model.num_experts=3",
            "model.lora_rank=4",
            "match_params=true",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "num_threads=1",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    sizes = results["sizes"]
    target = sizes["mmoe"]["params"]
    assert abs(sizes["home"]["params"] - target) <= TOLERANCE * target
    assert sizes["mmoe"]["sizes"]["expert_hidden"] == [16]
    assert sizes["home"]["sizes"]["expert_hidden"] != [16]
    # The runs trained the matched sizes: their model parameter counts are the recorded ones.
    for run in results["runs"]:
        assert run["params"]["model"] == sizes[run["model"]]["params"]
    report = (out / "report.md").read_text()
    part = report.split("## Sizes")[1].split("\n## ")[0]
    row = next(line for line in part.splitlines() if line.startswith("| home |"))
    assert str(sizes["home"]["params"]) in row and "expert_hidden=" in row
    assert "Sizes:" in capsys.readouterr().out


def test_compare_refuses_an_unreachable_count_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    overrides = [*TINY, "match_params=true", "match_params_to=10", f"output_dir={out}"]
    rc = main(["compare", "models=[mmoe,home]", "seeds=1", *overrides])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: match_params: model 'mmoe' cannot reach 10") and "\n" not in err
    assert not (out / "mmoe").exists()
