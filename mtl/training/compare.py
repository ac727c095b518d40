"""``mtl compare``: every model x seed on one data split, then the comparison report.

Each run is ``train(cfg)`` with ``cfg`` composed from ``conf/compare.yaml``, the
user's overrides, ``model=<name>`` and ``seed=<s>``. A ``model.<key>=<value>``
override goes to every model whose config has ``<key>`` (an error if none has),
so ``model.expert_hidden=[64]`` resizes MMoE and HoME alike; per-model values go
in ``model_overrides.<name>`` (e.g. ``+model_overrides.home.lora_rank=16``).
Each model's parameter count and sizes are printed and recorded; with
``match_params=true`` its widths are scaled to one parameter count
(:mod:`mtl.training.param_match`: the first model's, or ``match_params_to``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.training.build import DataModule, build_datamodule
from mtl.training.config import ConfigError, check_choice, compose_config
from mtl.training.config_checks import check_compare_config
from mtl.training.param_match import fair_sizes
from mtl.training.run_dir import COMPARE_FILES, RunLock, check_run_dir
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


def run_compare(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train every model of ``models`` with every seed of ``seeds`` on one data split.

    The data split seed is pinned to the base config's, so every run trains and
    tests on identical rows, and the data is loaded once and shared. Runs go to
    ``<output_dir>/<model>/seed<s>/`` (each with its ``test_scores.npz``, which the
    report's paired tests read); the report (``report.md``, ``results.json``, PNG
    plots) to ``<output_dir>``.

    Returns:
        The ``results.json`` content.
    """
    from mtl.training.report import write_report

    base = compare_config(overrides)
    check_compare_config(base)
    if str(base.kind) != "rec":
        raise ConfigError("mtl compare supports the ranking models (kind: rec) only")
    models = [str(m) for m in base.models]
    if not models:
        raise ConfigError("models is empty; e.g. models=[mmoe,home]")
    for name in models:
        check_choice("model", name)
    seeds = seed_list(base.seeds if isinstance(base.seeds, int) else list(base.seeds))
    per_model = _model_overrides(models, overrides)
    others = [o for o in overrides if not _is_model_key(o)]
    out_dir = Path(str(base.output_dir)).expanduser()
    # The data split must not follow the model seed.
    split_seed = base.data.get("split_seed")
    split_seed = base.data.get("seed", 0) if split_seed is None else split_seed
    # Each run checks and locks its own sub-folder; the lock here keeps two compares apart.
    with RunLock(out_dir):
        check_run_dir(
            out_dir,
            resume=base.get("resume"),
            overwrite=bool(base.get("overwrite")),
            names=COMPARE_FILES,
        )
        configs = {
            name: _run_config(name, seeds[0], others, per_model, out_dir, int(split_seed))
            for name in models
        }
        dm = build_datamodule(configs[models[0]])
        match_to = base.get("match_params_to")
        sizes = fair_sizes(
            configs,
            dm,
            match=bool(base.get("match_params", False)),
            match_to=None if match_to is None else int(match_to),
        )
        for name, size in sizes.items():
            log.info("compare: %s has %d parameters, sizes %s", name, size["params"], size["sizes"])
        widths = {name: size["widths"] for name, size in sizes.items()}
        runs = _train_all(models, seeds, others, per_model, out_dir, int(split_seed), dm, widths)
        config = OmegaConf.to_container(base, resolve=True)
        return write_report(out_dir, runs, config=config, sizes=sizes)


def _run_config(
    name: str,
    seed: int,
    others: Sequence[str],
    per_model: dict[str, list[str]],
    out_dir: Path,
    split_seed: int,
) -> DictConfig:
    """The config of run ``name`` x ``seed``, its ``model_overrides`` merged."""
    cfg = compose_config(
        "compare",
        [
            *others,
            f"++data.split_seed={split_seed}",
            f"output_dir={out_dir / name / f'seed{seed}'}",
            f"model={name}",
            *per_model[name],
            f"seed={seed}",
        ],
    )
    extra = (cfg.get("model_overrides") or {}).get(name)
    if extra:
        cfg.model = OmegaConf.merge(cfg.model, extra)
    return cfg


def _train_all(
    models: Sequence[str],
    seeds: Sequence[int],
    others: Sequence[str],
    per_model: dict[str, list[str]],
    out_dir: Path,
    split_seed: int,
    dm: DataModule | None = None,
    widths: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every model x seed into ``out_dir/<model>/seed<s>``, on one shared data module.

    ``widths``: per model, width overrides merged last (from ``match_params``).
    """
    runs: list[dict[str, Any]] = []
    for name in models:
        for seed in seeds:
            run_dir = out_dir / name / f"seed{seed}"
            cfg = _run_config(name, seed, others, per_model, out_dir, split_seed)
            if (widths or {}).get(name):
                cfg.model = OmegaConf.merge(cfg.model, (widths or {})[name])
            if dm is None:
                dm = build_datamodule(cfg)
            # Shared data module: only the shuffle seed may differ between runs.
            dm.seed = int(cfg.data.get("seed", dm.seed))
            log.info("compare: model=%s seed=%d -> %s", name, seed, run_dir)
            runs.append(train(cfg, datamodule=dm))
    return runs
