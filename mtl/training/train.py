"""``train(cfg)``: one run of ``mtl train``, for rankers (``kind: rec``) and LMs (``kind: lm``).

Everything is built from the composed config (:mod:`mtl.training.build`): data,
network, LightningModule, callbacks, loggers, trainer. The run fits, evaluates
(rec: the test split from the best checkpoint; lm: a last validation pass and a
generated sample), and writes ``<output_dir>/config.yaml``, ``checkpoints/``,
``csv/metrics.csv``, TensorBoard events and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from mtl.data.data_record import summary_lines
from mtl.training.build import (
    DataModule,
    Module,
    build,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    plain,
)
from mtl.training.checkpoints import StrictCheckpointIO, check_resume_checkpoint
from mtl.training.compile import compile_model
from mtl.training.config import ConfigError, resume_checkpoint_path, to_yaml
from mtl.training.config_checks import check_train_config
from mtl.training.finite_guard import NonFiniteError
from mtl.training.gate_config import gate_name
from mtl.training.lm_module import LMModule
from mtl.training.ranks import is_launch_rank_zero
from mtl.training.rec_module import RecModule
from mtl.training.results import TEST_SCORES_FILE, write_json, write_test_scores
from mtl.training.run_dir import RunLock, check_run_dir, config_checkpoint_dir, prepare_run_dir

log = logging.getLogger(__name__)

DEFAULT_GENERATE: dict[str, Any] = {
    "prompt": "",
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": None,
    "seed": 0,
}
"""The LM sample's settings where ``cfg.generate`` leaves them out."""


def resolve_monitor(cfg: DictConfig, module: Module) -> tuple[str, str]:
    """The metric key checkpoints and early stopping watch, and ``"min"``/``"max"``.

    ``monitor: auto`` is the module's ``default_monitor`` (``val/auc_mean`` when a
    rec task is binary, else ``val/loss``); ``monitor_mode: auto`` maximises
    AUC/GAUC keys and minimises everything else.

    Raises:
        ConfigError: the key is not one the module logs.
    """
    monitor = str(cfg.get("monitor", "auto"))
    if monitor == "auto":
        monitor = module.default_monitor
    known = module.monitor_keys()
    if monitor not in known and not monitor.startswith(module.monitor_prefixes):
        raise ConfigError(f"monitor {monitor!r} is not a logged metric; choose one of {known}")
    mode = str(cfg.get("monitor_mode", "auto"))
    if mode == "auto":
        mode = "max" if "auc" in monitor else "min"  # auc_mean, auc/<task>, gauc/<task>
    if mode not in ("min", "max"):
        raise ConfigError(f"monitor_mode must be min, max or auto, got {mode!r}")
    return monitor, mode


@contextmanager
def run_settings(num_threads: int | None) -> Iterator[None]:
    """Within a run: ``num_threads`` torch CPU threads (None: unchanged) and no Lightning
    advice that does not apply to in-memory loaders; both restored afterwards."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        with warnings.catch_warnings():
            for pattern in (
                ".*does not have many workers.*",
                ".*log_every_n_steps.*",
                ".*LeafSpec.*",
                # rec metrics are synced by torchmetrics, not by self.log(sync_dist=True)
                ".*when logging on epoch level in distributed setting.*",
            ):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        torch.set_num_threads(before)


def train(cfg: DictConfig, datamodule: DataModule | None = None) -> dict[str, Any]:
    """Train one model as ``cfg`` says, evaluate it, write ``<output_dir>/metrics.json``.

    Args:
        cfg: a composed ``train`` config (:func:`mtl.training.config.compose_config`).
        datamodule: an already prepared data module to reuse (``mtl compare`` shares
            one across runs); None builds it from ``cfg.data``.

    Returns:
        The ``metrics.json`` content. Both kinds: ``kind``, ``model``, ``seed``,
        ``data``, ``monitor``, ``best_score``, ``params``, ``train_time_s``, ``epochs``,
        ``global_step``, ``best_ckpt``, ``last_ckpt``, ``output_dir``. Rec: ``tasks``,
        ``split`` (what it trained on: :meth:`~mtl.data.datamodule.RecDataModule.split_summary`),
        ``test`` and ``last_val`` (``{metric/task: value}``), ``tested`` (``"best
        checkpoint"`` or ``"final weights"``), ``diagnostics``, ``test_scores`` (the
        file of per-task test predictions and labels in ``output_dir``). LM:
        ``val_loss``, ``val_ppl``, ``unigram_entropy``, ``bigram_entropy``,
        ``train_loss``, ``tokens_per_s``, ``routing`` (per MoE layer the validation's
        scalar statistics and its ``tokens_per_expert`` list), ``sample`` (losses in
        nats per token).

    Raises:
        RunDirError: ``output_dir`` holds another run (without ``resume`` or
            ``overwrite``), is locked by a live run, or is not writable.
        CheckpointError: the resume checkpoint is unreadable or does not match the
            config; a checkpoint save failed.
        NonFiniteError: the loss or the weights became NaN or infinite
            (:class:`~mtl.training.finite_guard.FiniteGuard`): nothing is tested
            and no ``metrics.json`` is written.

    Example:
        >>> from mtl.training.config import compose_config
        >>> cfg = compose_config("train", ["trainer.max_epochs=1", "output_dir=/tmp/mtl_doc"])  # doctest: +SKIP
        >>> train(cfg)["test"]["auc/click"] > 0.5  # doctest: +SKIP
        True
    """
    check_train_config(cfg)
    out_dir = Path(str(cfg.output_dir)).expanduser()
    # Under DDP every process runs this; only rank 0 locks and writes the run folder.
    primary = is_launch_rank_zero()
    # Nothing in the folder changes until the folder, the resume checkpoint and the
    # writability checks pass (the lock file aside, removed again on failure).
    with RunLock(out_dir) if primary else nullcontext(), run_settings(cfg.get("num_threads")):
        earlier = (
            check_run_dir(
                out_dir,
                ckpt_dir=config_checkpoint_dir(cfg),
                resume=cfg.get("resume"),
                overwrite=bool(cfg.get("overwrite", False)),
            )
            if primary
            else None
        )
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = datamodule if datamodule is not None else build_datamodule(cfg)
        module = build_module(cfg, dm)
        # Rankers: what the run trains on (files, rows, label rates, the split), said up front.
        data_record = dm.split_summary() if hasattr(dm, "split_summary") else None
        if primary and data_record is not None:
            for line in summary_lines(str(dm.source), data_record):
                log.info(line)
        # A ranker compiles its model only: the embedding's per-table index work
        # would recompile the graph for every table.
        compile_model(
            module.net.model if isinstance(module, RecModule) else module.net, plain(cfg.compile)
        )
        monitor, mode = resolve_monitor(cfg, module)
        callbacks = build_callbacks(cfg, monitor=monitor, mode=mode)
        checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or checkpoint.dirpath is None:
            raise ConfigError(
                "callbacks need a model_checkpoint with a dirpath (tests and resume use it)"
            )
        ckpt_path = resume_checkpoint_path(cfg, Path(checkpoint.dirpath))
        if ckpt_path is not None:
            check_resume_checkpoint(ckpt_path, module)
        if primary:
            prepare_run_dir(
                out_dir, Path(checkpoint.dirpath), clear=bool(cfg.get("overwrite")), earlier=earlier
            )
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        trainer: pl.Trainer = build(
            cfg.trainer,
            what="trainer",
            callbacks=callbacks,
            logger=build_loggers(cfg),
            default_root_dir=str(out_dir),
            plugins=[StrictCheckpointIO()],
        )
        start = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        except NonFiniteError as exc:
            # A diverged run has no result: nothing is tested and no metrics.json written.
            raise NonFiniteError(f"{exc}; the run in {out_dir} failed, no metrics.json") from exc
        train_time = time.perf_counter() - start
        # Read now: testing from the best checkpoint restores the callback's state as it
        # was then, which in a one-epoch run predates last.ckpt.
        last_ckpt = checkpoint.last_model_path or None
        result: dict[str, Any] = {
            "kind": str(cfg.kind),
            "model": str(cfg.model_name),
            "gate": gate_name(module.net),
            "seed": int(cfg.seed),
            "data": str(dm.source),
            "monitor": checkpoint.monitor or monitor,  # val/loss after a MonitorFallback
            "train_time_s": train_time,
            "epochs": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
        }
        if data_record is not None:
            result["split"] = data_record
        if isinstance(module, LMModule):
            result |= _evaluate_lm(cfg, trainer, module, dm)
        else:
            result |= _test_rec(trainer, module, dm, checkpoint)
        result |= {
            "best_score": _number(checkpoint.best_model_score),
            "best_ckpt": checkpoint.best_model_path or None,
            "last_ckpt": last_ckpt,
            "output_dir": str(out_dir),
        }
        if primary and isinstance(module, RecModule) and module.test_scores:
            # Before metrics.json: a finished run always has its scores for `mtl compare`.
            write_test_scores(out_dir / TEST_SCORES_FILE, module.test_scores)
            result["test_scores"] = TEST_SCORES_FILE
        if primary:
            write_json(out_dir / "metrics.json", result)
            log.info("metrics written to %s", out_dir / "metrics.json")
    return result


def _number(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _test_rec(
    trainer: pl.Trainer, module: RecModule, dm: DataModule, checkpoint: ModelCheckpoint
) -> dict[str, Any]:
    last_val = dict(module.eval_results.get("val", {}))
    best = checkpoint.best_model_path or None
    trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    diag = module.eval_diagnostics.get("test")
    return {
        # No best checkpoint (checkpoint.save_top_k=0): the test saw the final weights.
        "tested": "best checkpoint" if best else "final weights",
        "tasks": dict(module.task_kinds),
        "test": dict(module.eval_results.get("test", {})),
        "last_val": last_val,
        "params": module.num_params,
        "epoch_times_s": list(module.epoch_times_s),
        "diagnostics": None if diag is None else diag.to_dict(),
        # per multi-gate level, the last validation's and the test's expert load vectors
        "routing": {**module.eval_loads.get("val", {}), **module.eval_loads.get("test", {})},
    }


def _evaluate_lm(
    cfg: DictConfig, trainer: pl.Trainer, module: LMModule, dm: DataModule
) -> dict[str, Any]:
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    gen = {**DEFAULT_GENERATE, **(plain(cfg.get("generate")) or {})}
    sample = module.generate(
        str(gen["prompt"]),
        max_new_tokens=int(gen["max_new_tokens"]),
        temperature=float(gen["temperature"]),
        top_k=gen["top_k"],
        seed=gen["seed"],
    )
    return {
        "val_loss": _number(val["val/loss"]),
        "val_ppl": _number(val["val/ppl"]),
        "unigram_entropy": dm.unigram_entropy(),
        "bigram_entropy": dm.bigram_entropy(),
        "train_loss": _number(train_metrics.get("train/loss")),
        "tokens_per_s": _number(train_metrics.get("train/tokens_per_s")),
        "params": module.net.parameter_counts(),
        # per layer: the scalar statistics, and the load vector (token slots per expert)
        "routing": {
            **{k: float(v) for k, v in val.items() if k.startswith("val/moe/")},
            **module.val_load.as_dict("val/moe/"),
        },
        "sample": sample,
    }
