"""``mtl train`` for language models (``kind: lm``): data, model and trainer from a Hydra config.

Reads these keys of the composed ``train`` config: ``model`` (an ``lm_*`` preset:
``_target_`` + kwargs), ``data`` (a ``TextDataModule``), ``trainer``
(``pl.Trainer`` kwargs), ``seed``, ``output_dir``, ``optim`` (see
:class:`~mtl.training.lm_module.LMModule`), ``resume`` (null | last | path),
``checkpoint.save_top_k``, ``early_stopping`` and, optionally, ``generate``
(``prompt``, ``max_new_tokens``, ``temperature``, ``top_k``) for the sample
printed at the end.

Writes ``<output_dir>/config.yaml``, ``checkpoints/`` (best by ``val/loss`` and
``last.ckpt``), ``csv/metrics.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

from mtl.data.text import TextDataModule
from mtl.moe import SigmoidBiasGate
from mtl.training.callbacks import ValidateAtMaxSteps
from mtl.training.compile import compile_model
from mtl.training.config import resume_checkpoint_path, start_run, trainer_kwargs_from
from mtl.training.lm_module import AuxFreeBiasUpdate, LMModule

log = logging.getLogger(__name__)

DEFAULT_GENERATE: dict[str, Any] = {
    "prompt": "",
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": None,
    "seed": 0,
}


def build_datamodule(cfg: DictConfig) -> TextDataModule:
    """Instantiate ``cfg.data`` and prepare it (read, tokenise, split; errors surface here)."""
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm


def model_config(cfg: DictConfig, dm: TextDataModule) -> dict[str, Any]:
    """The model config as a plain dict, with ``vocab_size`` and ``max_seq_len`` from the data."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    if model_cfg.get("max_seq_len") is None:
        model_cfg["max_seq_len"] = int(dm.block_size)
    elif int(model_cfg["max_seq_len"]) < dm.block_size:
        raise ValueError(
            f"model.max_seq_len={model_cfg['max_seq_len']} is shorter than "
            f"data.block_size={dm.block_size}"
        )
    if model_cfg.get("vocab_size") is None:
        model_cfg["vocab_size"] = dm.vocab_size  # an explicit, different value fails in build_lm
    return model_cfg


def _callbacks(
    cfg: DictConfig, module: LMModule, ckpt_dir: Path, *, progress_bar: bool
) -> list[pl.Callback]:
    ckpt_cfg = cfg.get("checkpoint") or {}
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-step{step:06d}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
        save_top_k=int(ckpt_cfg.get("save_top_k", 1)),
        save_last=True,
    )
    callbacks: list[pl.Callback] = [checkpoint, ValidateAtMaxSteps()]
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    if any(isinstance(m.gate, SigmoidBiasGate) for m in module.model.moe_layers().values()):
        callbacks.append(AuxFreeBiasUpdate())
    es_cfg = cfg.get("early_stopping") or {}
    if es_cfg.get("enabled", False):
        callbacks.append(
            EarlyStopping(
                monitor="val/loss",
                mode="min",
                patience=int(es_cfg.get("patience", 3)),
                min_delta=float(es_cfg.get("min_delta", 0.0)),
            )
        )
    return callbacks


def _float(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train an LM from a composed config; return the final metrics.

    Args:
        cfg: a composed ``train`` config with ``kind: lm`` (e.g. from
            ``compose_config("train", ["experiment=lm_mixtral"])``).

    Returns:
        ``{"model", "seed", "val_loss", "val_ppl", "unigram_entropy",
        "bigram_entropy", "train_loss", "tokens_per_s", "global_step",
        "train_time_s", "params", "routing", "best_ckpt", "last_ckpt", "sample",
        "output_dir"}``; losses in nats per token.

    Example:
        >>> from mtl.training.config import compose_config
        >>> cfg = compose_config("train", ["experiment=lm_mixtral", "trainer.max_steps=20"])  # doctest: +SKIP
        >>> run_train(cfg)["val_loss"] < run_train(cfg)["unigram_entropy"]  # doctest: +SKIP
        True
    """
    out_dir = start_run(cfg)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    dm = build_datamodule(cfg)
    trainer_kwargs = trainer_kwargs_from(cfg)
    max_steps = int(trainer_kwargs.get("max_steps", -1))
    module = LMModule(
        model=model_config(cfg, dm),
        tokenizer=dm.tokenizer,
        optim=cfg.get("optim"),
        max_steps=max_steps if max_steps > 0 else None,
    )
    compile_model(module.model, cfg.get("compile"))
    ckpt_dir = out_dir / "checkpoints"
    callbacks = _callbacks(
        cfg, module, ckpt_dir, progress_bar=bool(trainer_kwargs.get("enable_progress_bar", True))
    )
    logger = CSVLogger(save_dir=str(out_dir), name="csv", version="")
    trainer = pl.Trainer(
        **trainer_kwargs, callbacks=callbacks, logger=logger, default_root_dir=str(out_dir)
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_checkpoint_path(cfg, ckpt_dir))
    train_time = time.perf_counter() - start
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    gen_cfg = {**DEFAULT_GENERATE, **dict(OmegaConf.to_container(cfg.get("generate") or {}))}
    sample = module.generate(
        str(gen_cfg["prompt"]),
        max_new_tokens=int(gen_cfg["max_new_tokens"]),
        temperature=float(gen_cfg["temperature"]),
        top_k=gen_cfg["top_k"],
        seed=gen_cfg["seed"],
    )
    checkpoint = callbacks[0]
    assert isinstance(checkpoint, ModelCheckpoint)
    result: dict[str, Any] = {
        "model": str(cfg.model.get("name", cfg.model.get("_target_", "?"))),
        "seed": int(cfg.get("seed", 0)),
        "data": dm.source,
        "val_loss": _float(val["val/loss"]),
        "val_ppl": _float(val["val/ppl"]),
        "unigram_entropy": dm.unigram_entropy(),
        "bigram_entropy": dm.bigram_entropy(),
        "train_loss": _float(train_metrics.get("train/loss")),
        "tokens_per_s": _float(train_metrics.get("train/tokens_per_s")),
        "global_step": int(trainer.global_step),
        "train_time_s": train_time,
        "params": module.model.parameter_counts(),
        "routing": {k: float(v) for k, v in val.items() if k.startswith("val/moe/")},
        "best_ckpt": checkpoint.best_model_path or None,
        "last_ckpt": checkpoint.last_model_path or None,
        "sample": sample,
        "output_dir": str(out_dir),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(
        f"\n{result['model']}: val loss {result['val_loss']:.4f} nats/token "
        f"(ppl {result['val_ppl']:.2f}); unigram entropy {result['unigram_entropy']:.4f}, "
        f"bigram {result['bigram_entropy']:.4f}; {result['global_step']} steps in "
        f"{train_time:.1f} s; params {result['params']['total']:,} total / "
        f"{result['params']['active']:,} active"
    )
    print(f"sample:\n{sample[:400]}\n")
    print(f"output: {out_dir}")
    return result


def run_from_overrides(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose ``conf/train.yaml`` with ``overrides`` and run it (tests, notebooks).

    Example:
        >>> run_from_overrides(["experiment=lm_dense", "trainer.max_steps=10"])  # doctest: +SKIP
    """
    from mtl.training.config import compose_config

    return run_train(compose_config("train", list(overrides)))


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> LMModule:
    """Rebuild an :class:`LMModule` (model and tokenizer) from one of this runner's checkpoints.

    Example:
        >>> module = load_checkpoint("runs/lm_mixtral/.../checkpoints/last.ckpt")  # doctest: +SKIP
        >>> print(module.generate("ROMEO:", max_new_tokens=100))  # doctest: +SKIP
    """
    return LMModule.load_from_checkpoint(str(path), map_location=map_location)
