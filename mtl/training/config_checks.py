"""Checks of a composed config before a run builds anything or touches its folder.

Each bad value is one :class:`~mtl.training.config.ConfigError` naming the key,
the value and what is expected, instead of a traceback from deep inside torch or
Lightning, or a run that trains and reports a meaningless result:

- ``seed``, ``data.seed``, ``data.split_seed``: integers (``seed=abc`` named);
- ``data.batch_size``: a positive integer; with Mixture-of-Tokens FFNs it and
  ``data.val_batch_size`` are multiples of ``model.moe.group_size``;
- ``optim.lr``: a positive finite number (``0`` trains nothing, a negative rate
  ascends the loss);
- ``task_weights`` and ``data.task_weights``: finite and not negative (a negative
  weight maximises that task's loss);
- ``trainer.precision`` for rankers (``kind: rec``): a precision they train in.
  ``16-true``/``bf16-true`` cast the weights but not the float32 numeric inputs
  and labels, and the losses and AUCs are meant to be float32;
- distributed trainer settings that cannot run (:func:`check_distributed`);
- ``mtl compare``: ``models`` and ``seeds`` without duplicates (two identical
  runs report a spread of 0).

:func:`config_group_errors` turns a ``TypeError`` raised while a config group is
built (a loader given an argument it does not take, or a value of the wrong type)
into one line naming the group; ``MTL_DEBUG=1`` still shows the traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.training.config import ConfigError

REC_PRECISIONS: tuple[str, ...] = ("32-true", "64-true", "bf16-mixed", "16-mixed")
"""``trainer.precision`` values rankers train in (Lightning's aliases 32, 64, bf16, 16 too)."""

_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def _get(cfg: Any, key: str) -> Any:
    """``cfg``'s value at dotted ``key``, or None where any part is missing."""
    return OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_seeds(cfg: DictConfig) -> None:
    """``seed`` (required), ``data.seed`` and ``data.split_seed`` (where set) are integers.

    Example:
        >>> check_seeds(OmegaConf.create({"seed": "abc"}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: seed must be an integer, got 'abc'
    """
    for key in ("seed", "data.seed", "data.split_seed"):
        value = _get(cfg, key)
        if value is None and key != "seed":
            continue
        if not _is_int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")


def check_batch_size(cfg: DictConfig) -> None:
    """``data.batch_size``, where set, is an integer >= 1."""
    value = _get(cfg, "data.batch_size")
    if value is not None and not (_is_int(value) and value >= 1):
        raise ConfigError(f"data.batch_size must be an integer >= 1, got {value!r}")


def check_token_groups(cfg: DictConfig) -> None:
    """With Mixture-of-Tokens FFNs (``model.moe`` a ``MixtureOfTokensFFN``),
    ``data.batch_size`` and ``data.val_batch_size`` (each process's batches) are
    multiples of ``model.moe.group_size``: a smaller group runs another function.
    A :class:`~mtl.data.text.TextDataModule`'s ``batch_multiple`` must be one too,
    or its last validation batch would hold a smaller group.

    Example:
        >>> check_token_groups(OmegaConf.create({"data": {"batch_size": 12}, "model": {"moe": {
        ...     "_target_": "mtl.moe.mixture_of_tokens.MixtureOfTokensFFN", "group_size": 8}}}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: data.batch_size=12 is not a multiple of model.moe.group_size=8: Mixture of Tokens mixes groups of 8 examples of each process's batch, and a smaller group computes a different function
    """
    if not str(_get(cfg, "model.moe._target_") or "").endswith("MixtureOfTokensFFN"):
        return
    group = _get(cfg, "model.moe.group_size")
    if not _is_int(group):
        return  # the layer refuses it with its own message
    if group < 1:
        # here, not in the layer: data.batch_multiple=${model.moe.group_size} would be refused first
        raise ConfigError(f"model.moe.group_size must be >= 1, got {group}")
    for key in ("data.batch_size", "data.val_batch_size"):
        value = _get(cfg, key)
        if _is_int(value) and value % group:
            raise ConfigError(
                f"{key}={value} is not a multiple of model.moe.group_size={group}: Mixture of "
                f"Tokens mixes groups of {group} examples of each process's batch, and a "
                "smaller group computes a different function"
            )
    multiple = _get(cfg, "data.batch_multiple")
    if str(_get(cfg, "data._target_") or "").endswith("TextDataModule") and not (
        _is_int(multiple) and multiple % group == 0
    ):
        raise ConfigError(
            f"data.batch_multiple={multiple} is not a multiple of model.moe.group_size={group}: "
            "the last validation batch would be a smaller group; set "
            "data.batch_multiple=${model.moe.group_size} (as experiment=lm_mot does)"
        )


def check_learning_rate(cfg: DictConfig) -> None:
    """``optim.lr``, where set, is a finite number > 0.

    Example:
        >>> check_learning_rate(OmegaConf.create({"optim": {"lr": 0}}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: optim.lr must be a finite number > 0, got 0
    """
    value = _get(cfg, "optim.lr")
    if value is None:
        return
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"optim.lr must be a finite number > 0, got {value!r}")


def check_task_weights(cfg: DictConfig) -> None:
    """``task_weights`` and ``data.task_weights``, where set: ``{task: finite number >= 0}``.

    Example:
        >>> check_task_weights(OmegaConf.create({"task_weights": {"click": -1.0}}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: task_weights.click must be a finite number >= 0, got -1.0
    """
    for key in ("task_weights", "data.task_weights"):
        weights = _get(cfg, key)
        if weights is None:
            continue
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{key} must map task names to weights, got {weights!r}")
        for task, weight in weights.items():
            if not (_is_number(weight) and math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"{key}.{task} must be a finite number >= 0, got {weight!r}")


def check_precision(cfg: DictConfig) -> None:
    """For ``kind: rec``, ``trainer.precision`` is one of :data:`REC_PRECISIONS` (or an alias).

    Example:
        >>> check_precision(OmegaConf.create({"kind": "rec", "trainer": {"precision": "bf16-true"}}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: trainer.precision='bf16-true' is not supported for ranking models (kind: rec); use one of 32-true, 64-true, bf16-mixed, 16-mixed
    """
    value = _get(cfg, "trainer.precision")
    if _get(cfg, "kind") != "rec" or value is None:
        return
    if _PRECISION_ALIASES.get(str(value), str(value)) not in REC_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={str(value)!r} is not supported for ranking models (kind: rec); "
            f"use one of {', '.join(REC_PRECISIONS)}"
        )


def _on_cpu(cfg: DictConfig) -> bool:
    accelerator = str(_get(cfg, "trainer.accelerator") or "auto")
    if accelerator == "auto":
        import torch  # here: the other checks do not need it

        return not torch.cuda.is_available()
    return accelerator == "cpu"


def check_distributed(cfg: DictConfig) -> None:
    """Distributed trainer settings that cannot run as configured, refused before any
    process starts:

    - ``trainer.sync_batchnorm: true`` on CPU: torch's ``SyncBatchNorm`` runs on GPUs
      only (it raises in the first training step);
    - Lightning's ``trainer.strategy=fsdp`` on CPU: torch's first FSDP needs CUDA;
      ``trainer=fsdp`` (FSDP2) runs on CPU and GPUs;
    - ``trainer=fsdp`` for rankers (``kind: rec``): it shards transformer blocks.

    Example:
        >>> check_distributed(OmegaConf.create(
        ...     {"kind": "rec", "trainer": {"accelerator": "cpu", "sync_batchnorm": True}}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU. Set trainer.sync_batchnorm=false (each process normalises with its own batch, see conf/trainer/ddp.yaml) or train on GPUs
    """
    cpu = _on_cpu(cfg)
    if cpu and _get(cfg, "trainer.sync_batchnorm"):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU. "
            "Set trainer.sync_batchnorm=false (each process normalises with its own batch, see "
            "conf/trainer/ddp.yaml) or train on GPUs"
        )
    strategy = _get(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith("fsdp") and cpu:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is torch's first FSDP, which needs CUDA GPUs. On CPU "
            "use trainer=fsdp (FSDP2, mtl.training.fsdp.FSDPStrategy) or trainer=ddp"
        )
    target = str(_get(cfg, "trainer.strategy._target_") or "")
    if target.endswith("fsdp.FSDPStrategy") and _get(cfg, "kind") == "rec":
        raise ConfigError(
            "trainer=fsdp shards the transformer blocks of language models (kind: lm); "
            "rankers (kind: rec) train with trainer=ddp"
        )


def check_train_config(cfg: DictConfig) -> None:
    """Every check of this module that applies to one run (``mtl train``).

    Raises:
        ConfigError: the first bad value, naming its key.

    Example:
        >>> from mtl.training.config import compose_config
        >>> check_train_config(compose_config("train", ["optim.lr=-1"]))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: optim.lr must be a finite number > 0, got -1
    """
    check_seeds(cfg)
    check_batch_size(cfg)
    check_token_groups(cfg)
    check_learning_rate(cfg)
    check_task_weights(cfg)
    check_precision(cfg)
    check_distributed(cfg)


def check_compare_config(cfg: DictConfig) -> None:
    """``mtl compare``'s config: :func:`check_train_config`, and ``models`` and ``seeds``
    (an int n, or a list of integers) without duplicates.

    Example:
        >>> check_compare_config(OmegaConf.create({"seed": 0, "models": ["mmoe"], "seeds": [1, 1]}))
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: seeds lists 1 twice; each run must differ (seeds=[1, 1])
    """
    check_train_config(cfg)
    models = _get(cfg, "models")
    seeds = _get(cfg, "seeds")
    lists = {"models": [] if models is None else list(models)}
    if seeds is not None and not _is_int(seeds):
        if not OmegaConf.is_list(seeds):
            raise ConfigError(f"seeds must be an integer n or a list of integers, got {seeds!r}")
        bad = [s for s in seeds if not _is_int(s)]
        if bad:
            raise ConfigError(f"seeds must be integers, got {bad[0]!r} (seeds={list(seeds)})")
        lists["seeds"] = list(seeds)
    for key, values in lists.items():
        seen: set[Any] = set()
        for value in values:
            if value in seen:
                raise ConfigError(
                    f"{key} lists {value} twice; each run must differ ({key}={values})"
                )
            seen.add(value)


@contextmanager
def config_group_errors(group: str) -> Iterator[None]:
    """Within: a ``TypeError`` becomes a :class:`ConfigError` naming config ``group``.

    Building a group from the config calls library code with the user's values; a
    ``TypeError`` there (an unknown ``data.source_kwargs`` key, a string where a
    number is due) is a config error. The original stays chained (``MTL_DEBUG=1``).

    Example:
        >>> with config_group_errors("data"):
        ...     int([])
        Traceback (most recent call last):
        ...
        mtl.training.config.ConfigError: data: int() argument must be ... (check the data.* settings; MTL_DEBUG=1 shows where)
    """
    try:
        yield
    except TypeError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(
            f"{group}: {message} (check the {group}.* settings; MTL_DEBUG=1 shows where)"
        ) from exc
