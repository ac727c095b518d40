"""``mtl compare`` composes each model with its dataset experiment's sizes (no training)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import DictConfig

from mtl.training import compare
from mtl.training.build import plain
from mtl.training.compare import _check_shared, size_experiment
from mtl.training.config import ConfigError, compose_config
from mtl.training.param_match import model_sizes
from mtl.training.report import sizes_table

CENSUS_MODELS = ["mmoe", "omoe", "ple", "home", "shared_bottom"]


def run_configs(overrides: list[str]) -> dict[str, DictConfig]:
    """Per model, the config ``mtl compare`` checks and sizes it with (compose only, no data)."""
    return compare._first_seed_configs(compare._plan(overrides))


def test_census_data_sizes_every_model_from_its_census_experiment() -> None:
    configs = run_configs([f"models=[{','.join(CENSUS_MODELS)}]", "data=census_income", "seeds=2"])
    assert list(configs) == CENSUS_MODELS
    for name, cfg in configs.items():
        # Reference: `mtl train experiment=census_<name>` composed on its own.
        want = compose_config("train", [f"experiment=census_{name}"])
        assert model_sizes(plain(cfg.model)) == model_sizes(plain(want.model)), name
        assert cfg.model._target_ == want.model._target_
        assert cfg.data.batch_size == want.data.batch_size == 512
        assert cfg.model_name == name and cfg.data.source == "census_income"
    # The experiments change the sizes: the plain model configs are much wider.
    assert configs["mmoe"].model.expert_hidden == [64]
    assert compose_config("train", ["model=mmoe"]).model.expert_hidden == [256, 128]


def test_command_line_overrides_win_over_the_size_experiments() -> None:
    configs = run_configs(
        [
            "models=[mmoe,home]",
            "data=census_income",
            "trainer.max_epochs=2",
            "model.tower_hidden=[8]",
            "+model_overrides.home.lora_rank=5",
        ]
    )
    assert all(c.trainer.max_epochs == 2 for c in configs.values())
    assert all(c.model.tower_hidden == [8] for c in configs.values())
    assert configs["home"].model.lora_rank == 5
    assert configs["home"].model.expert_hidden == [48]  # still the experiment's


def test_sizes_from_null_or_other_data_keep_the_model_configs() -> None:
    plain_cfgs = run_configs(["models=[mmoe,ple]", "data=census_income", "sizes_from=null"])
    assert plain_cfgs["mmoe"].model.expert_hidden == [256, 128]
    synthetic = run_configs(["models=[mmoe,ple]"])  # synthetic_ctr has no size experiments
    assert synthetic["ple"].model.expert_hidden == [256, 128]
    assert synthetic["ple"].data.source == "synthetic_ctr"
    # A prefix named explicitly sizes the models on data named on the command line...
    named = run_configs(["models=[mmoe,ple]", "sizes_from=census", "data=census_income"])
    assert named["ple"].model.expert_hidden == [72]
    # ...and is refused where its experiment would silently switch the data.
    with pytest.raises(ConfigError, match="trains on 'census_income', not on 'synthetic_ctr'"):
        run_configs(["models=[mmoe,ple]", "sizes_from=census"])


def test_models_without_a_size_experiment_keep_their_config() -> None:
    base = compose_config("compare", ["data=census_income"])
    assert size_experiment(base, "home") == "census_home"
    assert size_experiment(base, "esmm") is None  # no census_esmm: ESMM needs ctr/ctcvr tasks
    # An experiment named after the model family is found by the model it selects.
    assert size_experiment(base, "task_routed_moe") == "census_task_routed"


def test_size_experiments_that_disagree_on_the_data_are_refused() -> None:
    configs = run_configs(["models=[mmoe,ple]", "data=census_income"])
    configs["ple"].data.batch_size = 1024
    with pytest.raises(ConfigError, match=r"'mmoe' and 'ple' differ in 'data'"):
        _check_shared(configs)


def test_sizes_table_says_which_experiment_sized_each_model() -> None:
    sizes = {
        "home": {"params": 192818, "scale": 1.0, "sizes": {"expert_hidden": [48]}},
        "esmm": {"params": 5000, "scale": 1.0, "sizes": {"tower_hidden": [8]}},
    }
    sizes["home"]["experiment"] = "census_home"
    rows = sizes_table(sizes)
    assert rows[1] == ["home", "192818", "experiment=census_home", "1", "expert_hidden=[48]"]
    assert rows[2][2] == "its model config"


def test_runs_are_interleaved_by_seed_and_reported_model_by_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []

    def fake_train(cfg: DictConfig, datamodule: object = None) -> dict:
        calls.append((str(cfg.model_name), int(cfg.seed)))
        return {"model": str(cfg.model_name), "seed": int(cfg.seed)}

    monkeypatch.setattr(compare, "train", fake_train)
    plan = compare._plan(["models=[mmoe,ple]", "seeds=2", f"output_dir={tmp_path}"])
    runs = compare._train_all(plan, SimpleNamespace(seed=0))
    assert calls == [("mmoe", 0), ("ple", 0), ("mmoe", 1), ("ple", 1)]
    assert [(r["model"], r["seed"]) for r in runs] == [
        ("mmoe", 0),
        ("mmoe", 1),
        ("ple", 0),
        ("ple", 1),
    ]
    for run in runs:  # the load average before and after each run
        assert run["load_avg"]["start"] is None or len(run["load_avg"]["start"]) == 3
        assert run["load_avg"]["end"] is None or len(run["load_avg"]["end"]) == 3


def test_size_experiments_are_looked_up_once_per_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    lookup = compare.size_experiment

    def counting_lookup(base: DictConfig, name: str) -> str | None:
        looked_up.append(name)
        return lookup(base, name)

    def fake_train(cfg: DictConfig, datamodule: object = None) -> dict:
        return {"model": str(cfg.model_name), "seed": int(cfg.seed), "cfg": cfg}

    monkeypatch.setattr(compare, "size_experiment", counting_lookup)
    monkeypatch.setattr(compare, "train", fake_train)
    overrides = ["models=[mmoe,ple]", "data=census_income", "seeds=3", f"output_dir={tmp_path}"]
    runs = compare._train_all(compare._plan(overrides), SimpleNamespace(seed=0))
    assert sorted(looked_up) == ["mmoe", "ple"]  # not once per model x seed
    # every seed's run still has its model's experiment sizes (census_ple: expert_hidden [72])
    assert [r["cfg"].model.expert_hidden for r in runs if r["model"] == "ple"] == [[72]] * 3
