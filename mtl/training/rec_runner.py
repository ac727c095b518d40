"""Train / compare runners for the ranking models, driven by a composed Hydra config.

``run_train(cfg)`` trains one model (data module from ``cfg.data``, model from
``cfg.model``, ``pl.Trainer(**cfg.trainer)``), tests the best checkpoint and writes
``metrics.json``. ``run_compare(overrides)`` repeats that for every model x seed on
one fixed data split and writes the comparison report (:mod:`mtl.training.report`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from mtl.data.datamodule import RecDataModule
from mtl.training.callbacks import ValidateAtMaxSteps
from mtl.training.compile import compile_model
from mtl.training.config import (
    compose_config,
    resume_checkpoint_path,
    start_run,
    trainer_kwargs_from,
)
from mtl.training.rec_module import RecModule

log = logging.getLogger(__name__)

# Lightning's advice lines (workers, logging interval, ...) do not apply to in-memory tensor loaders.
for _pattern in (".*does not have many workers.*", ".*log_every_n_steps.*", ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", message=_pattern)


_DIAGNOSTIC_KEYS = (
    "val/collapse_",
    "val/expert_scale_cv",
    "val/degraded_",
    "val/own_expert_share/",
)


def monitor_keys(module: RecModule) -> list[str]:
    """Validation metric keys a run logs for ``module``'s tasks (diagnostics keys aside)."""
    keys = ["val/loss"]
    kinds = set(module.task_kinds.values())
    if "binary" in kinds:
        keys += ["val/auc_mean", "val/logloss_mean"] + (
            ["val/gauc_mean"] if module.spec.user_column else []
        )
    for task, kind in module.task_kinds.items():
        names = (
            ["auc", "logloss"] + (["gauc"] if module.spec.user_column else [])
            if kind == "binary"
            else ["mse"]
        )
        keys += [f"val/loss/{task}", *[f"val/{n}/{task}" for n in names]]
    return keys


def resolve_monitor(cfg: DictConfig, module: RecModule) -> tuple[str, str]:
    """The metric key checkpoints and early stopping watch, and ``"min"``/``"max"``.

    ``monitor: auto`` is ``val/auc_mean`` when any task is binary (else ``val/loss``);
    ``monitor_mode: auto`` maximises AUC/GAUC keys and minimises everything else.

    Raises:
        ValueError: the key is not one the run logs (see :func:`monitor_keys`).
    """
    monitor = str(cfg.get("monitor", "auto"))
    if monitor == "auto":
        binary = any(kind == "binary" for kind in module.task_kinds.values())
        monitor = "val/auc_mean" if binary else "val/loss"
    known = monitor_keys(module)
    if monitor not in known and not monitor.startswith(_DIAGNOSTIC_KEYS):
        raise ValueError(f"monitor {monitor!r} is not a logged metric; choose one of {known}")
    mode = str(cfg.get("monitor_mode", "auto"))
    if mode == "auto":
        mode = "max" if "auc" in monitor else "min"  # auc_mean, auc/<task>, gauc/<task>
    if mode not in ("min", "max"):
        raise ValueError(f"monitor_mode must be min, max or auto, got {mode!r}")
    return monitor, mode


def _finite(value: Any) -> Any:
    # JSON has no NaN; null keeps the file readable by every JSON parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, NaN/inf as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")


def build_datamodule(cfg: DictConfig) -> RecDataModule:
    """Instantiate ``cfg.data`` (a ``RecDataModule``) and prepare it (load, split, fit spec)."""
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm


def run_train(cfg: DictConfig, datamodule: RecDataModule | None = None) -> dict[str, Any]:
    """Train one rec model, test its best checkpoint, write ``<output_dir>/metrics.json``.

    Args:
        cfg: a composed ``train`` config (see ``conf/train.yaml``).
        datamodule: an already prepared data module to reuse (the compare runner
            shares one across runs); None builds it from ``cfg.data``.

    Returns:
        ``{"model", "seed", "test": {metric/task: value}, "best_val", "params",
        "train_time_s", "epochs", "best_ckpt", "diagnostics", "output_dir"}``.

    Example:
        >>> from mtl.training.config import compose_config, resume_checkpoint_path
        >>> cfg = compose_config("train", ["trainer.max_epochs=1", "output_dir=/tmp/mtl_doc"])  # doctest: +SKIP
        >>> run_train(cfg)["test"]["auc/click"] > 0.5  # doctest: +SKIP
        True
    """
    out_dir = start_run(cfg)
    threads = torch.get_num_threads()
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    try:
        return _train(cfg, out_dir, datamodule)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found


def _train(cfg: DictConfig, out_dir: Path, datamodule: RecDataModule | None) -> dict[str, Any]:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = datamodule if datamodule is not None else build_datamodule(cfg)
    module = RecModule(
        spec=dm.spec,
        model=cfg.model,
        optim=cfg.get("optim"),
        task_weights=cfg.get("task_weights"),
        embedding=cfg.get("embedding"),
        seed=int(cfg.seed),
        diagnostics=bool(cfg.get("diagnostics", True)),
    )
    compile_model(module.model, cfg.get("compile"))
    monitor, mode = resolve_monitor(cfg, module)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_cfg = cfg.get("checkpoint") or {}
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=int(ckpt_cfg.get("save_top_k", 1)),
        save_last=True,
        every_n_epochs=int(ckpt_cfg.get("every_n_epochs", 1)),
    )
    callbacks: list[pl.Callback] = [checkpoint, ValidateAtMaxSteps()]
    if cfg.trainer.get("enable_progress_bar", True):
        # A slower refresh keeps logs captured from non-TTY runs (CI, nohup) short.
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    es_cfg = cfg.get("early_stopping") or {}
    if es_cfg.get("enabled", True):
        callbacks.append(
            EarlyStopping(
                monitor=monitor,
                mode=mode,
                patience=int(es_cfg.get("patience", 3)),
                min_delta=float(es_cfg.get("min_delta", 0.0)),
            )
        )
    loggers = [
        CSVLogger(save_dir=str(out_dir), name="csv", version=""),
        TensorBoardLogger(save_dir=str(out_dir), name="tb", version="", default_hp_metric=False),
    ]
    trainer_kwargs = trainer_kwargs_from(cfg)
    trainer = pl.Trainer(
        **trainer_kwargs, callbacks=callbacks, logger=loggers, default_root_dir=str(out_dir)
    )

    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_checkpoint_path(cfg, ckpt_dir))
    train_time = time.perf_counter() - start
    best_val = dict(module.eval_results.get("val", {}))

    best = checkpoint.best_model_path or None
    trainer.test(module, datamodule=dm, ckpt_path=best or None, verbose=False)
    test = dict(module.eval_results.get("test", {}))
    diag = module.eval_diagnostics.get("test")
    result: dict[str, Any] = {
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "data": str(cfg.data.get("source", "")),
        "tasks": {t.name: t.kind for t in module.spec.tasks},
        "monitor": monitor,
        "best_score": None
        if checkpoint.best_model_score is None
        else float(checkpoint.best_model_score),
        "test": test,
        "last_val": best_val,
        "params": module.num_params,
        "train_time_s": train_time,
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "best_ckpt": best,
        "diagnostics": None if diag is None else diag.to_dict(),
        "output_dir": str(out_dir),
    }
    write_json(out_dir / "metrics.json", result)
    log.info("test metrics written to %s", out_dir / "metrics.json")
    return result


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


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def split_model_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(model.* overrides, the others)``; compare applies the former per model.

    Example:
        >>> split_model_overrides(["model.lora_rank=4", "seeds=2"])
        (['model.lora_rank=4'], ['seeds=2'])
    """
    model_ovr = [o for o in overrides if _override_key(o).startswith("model.")]
    return model_ovr, [o for o in overrides if o not in model_ovr]


def _accepted_args(model_name: str) -> set[str]:
    from mtl.models.rec import model_class

    return set(inspect.signature(model_class(model_name).__init__).parameters) - {
        "self",
        "d_in",
        "tasks",
    }


def run_compare(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train every model of ``models`` with every seed of ``seeds`` on one data split.

    Each run is composed from ``conf/compare.yaml`` with the user's ``overrides``
    plus ``model=<name>`` and ``seed=<s>``. A ``model.<key>=<value>`` override goes
    to every model whose class accepts ``<key>`` (an error if none does), so
    ``model.expert_hidden=[64]`` resizes MMoE and HoME alike; per-model values go
    in ``model_overrides.<name>`` (e.g. ``+model_overrides.home.lora_rank=16``).
    The data split seed is pinned to the base config's, so every run trains and
    tests on identical rows, and the data is loaded once and shared. Runs go to
    ``<output_dir>/<model>/seed<s>/``; the report (``report.md``, ``results.json``,
    PNG plots) to ``<output_dir>``.

    Returns:
        The ``results.json`` content.
    """
    from mtl.training.config import ConfigError, check_choice
    from mtl.training.report import write_report

    model_ovr, others = split_model_overrides(overrides)
    base = compose_config("compare", others)
    if str(base.get("kind", "rec")) != "rec":
        raise ValueError("mtl compare supports the ranking models (kind: rec) only")
    models = [str(m) for m in base.models]
    if not models:
        raise ValueError("models is empty; e.g. models=[mmoe,home]")
    for name in models:
        check_choice("model", name)
    seeds = seed_list(base.seeds if isinstance(base.seeds, int) else list(base.seeds))
    out_dir = Path(str(base.output_dir)).expanduser()
    # The data split must not follow the model seed.
    split_seed = base.data.get("split_seed")
    split_seed = base.data.get("seed", 0) if split_seed is None else split_seed
    pinned = [f"++data.split_seed={int(split_seed)}", f"output_dir={out_dir}"]

    per_model: dict[str, list[str]] = {}
    for name in models:
        registry_name = str(compose_config("compare", [*others, f"model={name}"]).model.name)
        accepted = _accepted_args(registry_name)
        per_model[name] = [
            "++" + o.lstrip("+") for o in model_ovr if _override_key(o).split(".")[1] in accepted
        ]
    unused = [
        o
        for o in model_ovr
        if not any(o.lstrip("+") == p[2:] for ps in per_model.values() for p in ps)
    ]
    if unused:
        raise ConfigError(f"overrides {unused} match no argument of the models {models}")
    out_dir.mkdir(parents=True, exist_ok=True)

    dm: RecDataModule | None = None
    runs: list[dict[str, Any]] = []
    for name in models:
        for seed in seeds:
            cfg = compose_config(
                "compare", [*others, *pinned, f"model={name}", *per_model[name], f"seed={seed}"]
            )
            extra = (cfg.get("model_overrides") or {}).get(name)
            if extra:
                cfg.model = OmegaConf.merge(cfg.model, extra)
            cfg.output_dir = str(out_dir / name / f"seed{seed}")
            if dm is None:
                dm = build_datamodule(cfg)
            # Shared data module: only the shuffle seed may differ between runs.
            dm.seed = int(cfg.data.get("seed", dm.seed))
            log.info("compare: model=%s seed=%d -> %s", name, seed, cfg.output_dir)
            runs.append(run_train(cfg, datamodule=dm))
    return write_report(out_dir, runs, config=OmegaConf.to_container(base, resolve=True))
