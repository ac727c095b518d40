"""``mtl compare``: every model x seed on one data split, then the comparison report.

Each run is ``train(cfg)`` with ``cfg`` composed from ``conf/compare.yaml``, the
user's overrides, ``model=<name>`` and ``seed=<s>``. A ``model.<key>=<value>``
override goes to every model whose config has ``<key>`` (an error if none has),
so ``model.expert_hidden=[64]`` resizes MMoE and HoME alike; per-model values go
in ``model_overrides.<name>`` (e.g. ``+model_overrides.home.lora_rank=16``).
Each model's sizes come from the data's experiment when it has one
(``sizes_from: auto``: with ``data=census_income``, model ``ple`` is composed with
``experiment=census_ple``; :func:`size_experiment`), so a dataset's tuned sizes apply
to every model. Each model's parameter count and sizes are printed and recorded; with
``match_params=true`` its widths are scaled to one parameter count
(:mod:`mtl.training.param_match`: the first model's, or ``match_params_to``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.training.build import DataModule, build_datamodule
from mtl.training.config import (
    ConfigError,
    available,
    check_choice,
    compose_config,
    conf_dir,
)
from mtl.training.config_checks import check_compare_config
from mtl.training.param_match import fair_sizes
from mtl.training.run_dir import COMPARE_FILES, RunLock, check_run_dir
from mtl.training.timing import load_average
from mtl.training.train import train

log = logging.getLogger(__name__)


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``3 -> [0, 1, 2]``; a list is used as given.

    Example:
        >>> seed_list(3), seed_list([7, 42])
        ([0, 1, 2], [7, 42])
    """
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    return [int(s) for s in seeds]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _is_model_key(override: str) -> bool:
    return _key(override).startswith("model.")


def compare_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The compare config without the ``model.*`` overrides (those go per model).

    Example:
        >>> cfg = compare_config(["models=[mmoe,ple]", "model.expert_hidden=[8]", "seeds=2"])
        >>> list(cfg.models), cfg.seeds
        (['mmoe', 'ple'], 2)
    """
    return compose_config("compare", [o for o in overrides if not _is_model_key(o)])


def _model_overrides(models: Sequence[str], overrides: Sequence[str]) -> dict[str, list[str]]:
    """Per model, the ``model.<key>`` overrides whose ``<key>`` its config has."""
    others = [o for o in overrides if not _is_model_key(o)]
    wanted = [o for o in overrides if _is_model_key(o)]
    per_model: dict[str, list[str]] = {}
    used: set[str] = set()
    for name in models:
        keys = set(compose_config("compare", [*others, f"model={name}"]).model)
        mine = [o for o in wanted if _key(o).split(".")[1] in keys]
        per_model[name] = [f"++{o.lstrip('+')}" for o in mine]
        used.update(mine)
    unused = [o for o in wanted if o not in used]
    if unused:
        raise ConfigError(f"overrides {unused} match no key of the model configs {list(models)}")
    return per_model


def size_experiment(base: DictConfig, name: str) -> str | None:
    """The experiment that sets model ``name``'s sizes on ``base``'s data, or None.

    ``sizes_from: auto`` looks up the prefix of ``data.source`` in ``size_experiments``;
    any other string is the prefix itself; ``null`` uses no experiment. The experiment is
    ``<prefix>_<name>`` when ``conf/experiment/<prefix>_<name>.yaml`` exists, else a
    ``<prefix>_*`` experiment that selects model ``name``.

    Example:
        >>> base = compare_config(["data=census_income"])
        >>> size_experiment(base, "ple"), size_experiment(base, "esmm")
        ('census_ple', None)
    """
    sizes_from = base.get("sizes_from", "auto")
    if sizes_from is None:
        return None
    prefix = str(sizes_from)
    if prefix == "auto":
        found = (base.get("size_experiments") or {}).get(str(base.data.get("source", "")))
        if found is None:
            return None
        prefix = str(found)
    experiments = available("experiment")
    if f"{prefix}_{name}" in experiments:
        return f"{prefix}_{name}"
    # An experiment named after the model's family (census_task_routed for task_routed_moe).
    for experiment in experiments:
        if experiment.startswith(f"{prefix}_") and _experiment_model(experiment) == name:
            return experiment
    return None


def _experiment_model(experiment: str) -> str | None:
    """The model an experiment selects (its ``override /model``), None if it selects none."""
    defaults = OmegaConf.load(conf_dir() / "experiment" / f"{experiment}.yaml").get("defaults")
    for entry in defaults or []:
        if isinstance(entry, DictConfig) and "override /model" in entry:
            return str(entry["override /model"])
    return None


RUN_ORDER = "interleaved by seed"
"""How :func:`run_compare` orders its runs (recorded in the report)."""

_SHARED_KEYS = ("data", "trainer", "optim", "scheduler", "task_weights")
"""Keys every run of a comparison must share, whatever experiment sized its model."""


@dataclass(frozen=True)
class _Plan:
    """What every run of one comparison is composed from, worked out once."""

    base: DictConfig
    """The checked compare config (``model.*`` overrides aside)."""
    models: list[str]
    seeds: list[int]
    others: list[str]
    """The overrides that are not ``model.*``."""
    per_model: dict[str, list[str]]
    """Per model, its ``model.*`` overrides (:func:`_model_overrides`)."""
    experiments: dict[str, str | None]
    """Per model, the experiment that sizes it (:func:`size_experiment`)."""
    out_dir: Path
    split_seed: int | None
    """The data split's seed, pinned for every run; None for data without one (``data=shards``:
    the split is fixed by ``mtl prepare``)."""


def _plan(overrides: Sequence[str]) -> _Plan:
    """The checked compare config, its models and seeds, and each model's overrides and sizes."""
    base = compare_config(overrides)
    check_compare_config(base)
    if str(base.kind) != "rec":
        raise ConfigError("mtl compare supports the ranking models (kind: rec) only")
    models = [str(m) for m in base.models]
    if not models:
        raise ConfigError("models is empty; e.g. models=[mmoe,home]")
    for name in models:
        check_choice("model", name)
    return _Plan(
        base=base,
        models=models,
        seeds=seed_list(base.seeds if isinstance(base.seeds, int) else list(base.seeds)),
        others=[o for o in overrides if not _is_model_key(o)],
        per_model=_model_overrides(models, overrides),
        experiments={name: size_experiment(base, name) for name in models},
        out_dir=Path(str(base.output_dir)).expanduser(),
        split_seed=_split_seed(base),
    )


def _split_seed(base: DictConfig) -> int | None:
    # The data split must not follow the model seed.
    if "split_seed" not in base.data:
        return None
    split_seed = base.data.get("split_seed")
    return int(base.data.get("seed", 0) if split_seed is None else split_seed)


def _check_shared(configs: dict[str, DictConfig]) -> None:
    """Every run must train on the same data with the same trainer and optimiser."""
    first, *rest = configs
    for name in rest:
        for key in _SHARED_KEYS:
            a, b = configs[first].get(key), configs[name].get(key)
            if a != b:
                raise ConfigError(
                    f"models {first!r} and {name!r} differ in {key!r} ({a} vs {b}): their "
                    "size experiments (sizes_from) must agree on it; set it on the command "
                    "line or use sizes_from=null"
                )


def run_compare(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train every model of ``models`` with every seed of ``seeds`` on one data split.

    The data split seed is pinned to the base config's (``data=shards`` has none: its
    split is the prepared one), so every run trains and tests on identical rows, and
    the data is loaded once and shared. Runs go to
    ``<output_dir>/<model>/seed<s>/`` (each with its ``test_scores.npz``, which the
    report's paired tests read); the report (``report.md``, ``results.json``, PNG
    plots) to ``<output_dir>``.

    Returns:
        The ``results.json`` content.
    """
    from mtl.training.report import write_report

    plan = _plan(overrides)
    base, out_dir = plan.base, plan.out_dir
    # Each run checks and locks its own sub-folder; the lock here keeps two compares apart.
    with RunLock(out_dir):
        check_run_dir(
            out_dir,
            resume=base.get("resume"),
            overwrite=bool(base.get("overwrite")),
            names=COMPARE_FILES,
        )
        configs = _first_seed_configs(plan)
        _check_shared(configs)
        dm = build_datamodule(configs[plan.models[0]])
        match_to = base.get("match_params_to")
        sizes = fair_sizes(
            configs,
            dm,
            match=bool(base.get("match_params", False)),
            match_to=None if match_to is None else int(match_to),
        )
        for name, size in sizes.items():
            size["experiment"] = plan.experiments[name]
            log.info(
                "compare: %s has %d parameters, sizes %s (from %s)",
                name,
                size["params"],
                size["sizes"],
                size["experiment"] or "its model config",
            )
        widths = {name: size["widths"] for name, size in sizes.items()}
        runs = _train_all(plan, dm, widths)
        config = OmegaConf.to_container(base, resolve=True)
        assert isinstance(config, dict)
        config["run_order"] = RUN_ORDER
        return write_report(out_dir, runs, config=config, sizes=sizes)


def _run_config(plan: _Plan, name: str, seed: int) -> DictConfig:
    """The config of run ``name`` x ``seed``: its size experiment, ``model_overrides`` merged."""
    base, experiment = plan.base, plan.experiments[name]
    cfg = compose_config(
        "compare",
        [
            *plan.others,
            *([f"experiment={experiment}"] if experiment else []),
            *([] if plan.split_seed is None else [f"++data.split_seed={plan.split_seed}"]),
            f"output_dir={plan.out_dir / name / f'seed{seed}'}",
            f"model={name}",
            *plan.per_model[name],
            f"seed={seed}",
        ],
    )
    if experiment and cfg.data.get("source") != base.data.get("source"):
        # An experiment also picks its data; the comparison's data must stay the user's.
        raise ConfigError(
            f"sizes_from: experiment {experiment!r} trains on {cfg.data.get('source')!r}, not "
            f"on {base.data.get('source')!r}; name the data (data=...) or set sizes_from=null"
        )
    extra = (cfg.get("model_overrides") or {}).get(name)
    if extra:
        cfg.model = OmegaConf.merge(cfg.model, extra)
    return cfg


def _first_seed_configs(plan: _Plan) -> dict[str, DictConfig]:
    """Per model, its run config at the first seed: what the shared-keys check and the
    parameter counts read (composed only, no data)."""
    return {name: _run_config(plan, name, plan.seeds[0]) for name in plan.models}


def _train_all(
    plan: _Plan,
    dm: DataModule | None = None,
    widths: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every model x seed into ``<output_dir>/<model>/seed<s>``, on one shared data module.

    Runs are interleaved by seed (seed 0 of every model, then seed 1, ...), so a
    change in the machine's load during the comparison falls on every model alike.
    ``widths``: per model, width overrides merged last (from ``match_params``).
    """
    models, seeds = plan.models, plan.seeds
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for name in models:
            run_dir = plan.out_dir / name / f"seed{seed}"
            cfg = _run_config(plan, name, seed)
            if (widths or {}).get(name):
                cfg.model = OmegaConf.merge(cfg.model, (widths or {})[name])
            if dm is None:
                dm = build_datamodule(cfg)
            # Shared data module: only the shuffle seed may differ between runs.
            dm.seed = int(cfg.data.get("seed", dm.seed))
            log.info("compare: model=%s seed=%d -> %s", name, seed, run_dir)
            before = load_average()
            result = train(cfg, datamodule=dm)
            result["load_avg"] = {"start": before, "end": load_average()}
            runs.append(result)
    # Reported model by model, each with its seeds in order.
    return sorted(runs, key=lambda r: (models.index(r["model"]), seeds.index(r["seed"])))
