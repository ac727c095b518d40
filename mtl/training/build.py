"""Building a run's parts from its config, each from a ``_target_`` node.

The network is built here and injected into its LightningModule: a ranker from
``cfg.embedding`` and ``cfg.model`` (``d_in`` and ``tasks`` from the data), a
language model from ``cfg.model`` (``vocab_size`` and ``max_seq_len`` from the
data). The config that built the network goes into the checkpoint, so that
:func:`load_module` rebuilds it from the checkpoint alone. Errors raised while
building a part become one :class:`~mtl.training.config.ConfigError` naming the part.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import Logger
from torch import nn

from mtl.data.datamodule import RecDataModule
from mtl.data.text import TextDataModule
from mtl.data.tokenizers import Tokenizer
from mtl.data.validation import check_label_cascade
from mtl.models.lm.transformer import TransformerLM
from mtl.models.rec.esmm import ESMM
from mtl.models.rec.ranker import Ranker
from mtl.training.checkpoints import read_checkpoint
from mtl.training.config import ConfigError
from mtl.training.config_checks import config_group_errors
from mtl.training.lm_module import LMModule
from mtl.training.rec_module import RecModule
from mtl.training.safe_load import check_trusted_targets, state_dict_mismatch
from mtl.training.upcycled_build import dense_weights, is_upcycled, upcycled_config

DataModule = RecDataModule | TextDataModule
Module = RecModule | LMModule


def plain(node: Any) -> Any:
    """A config node as plain dicts and lists (interpolations resolved); other values unchanged."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build(node: Any, *, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with plain containers for the arguments.

    Args:
        node: a config node or mapping with a ``_target_``.
        what: the part's name in error messages (``"model"``, ``"callbacks.early_stopping"``).
        kwargs: arguments injected at build time (``d_in``, ``tasks``, ...).

    Raises:
        ConfigError: the target cannot be imported, or rejects its arguments.

    Example:
        >>> build({"_target_": "torch.nn.Linear", "in_features": 4}, what="layer", out_features=2)
        Linear(in_features=4, out_features=2, bias=True)
    """
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        target = plain(node).get("_target_", "?") if isinstance(node, Mapping) else "?"
        message = " ".join(str(cause).split())
        raise ConfigError(f"could not build {what} ({target}): {message}") from exc


def build_datamodule(cfg: DictConfig) -> DataModule:
    """``cfg.data``, prepared (read, split, fitted): data errors surface here."""
    dm = build(cfg.data, what="data")
    with config_group_errors("data"):
        dm.setup("fit")
    return dm


def build_net(cfg: DictConfig, dm: DataModule) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a run, and the config that rebuilds it with :func:`build`.

    Returns:
        ``(net, net_config)``: a :class:`~mtl.models.rec.ranker.Ranker` for
        ``kind: rec``, a :class:`~mtl.models.lm.TransformerLM` for ``kind: lm``.
    """
    if cfg.kind == "lm":
        assert isinstance(dm, TextDataModule)
        net_config = {**plain(cfg.model)}
        # An explicit vocab_size that differs from the data's fails in LMModule.
        if net_config.get("vocab_size") is None:
            net_config["vocab_size"] = dm.vocab_size
        if net_config.get("max_seq_len") is None:
            net_config["max_seq_len"] = dm.block_size
        elif net_config["max_seq_len"] < dm.block_size:
            raise ConfigError(
                f"model.max_seq_len={net_config['max_seq_len']} is shorter than "
                f"data.block_size={dm.block_size}"
            )
        # fine-tuning entry points (model.checkpoint, init_checkpoint) check the run's tokenizer
        injected = {"tokenizer": dm.tokenizer} if _takes_tokenizer(net_config) else {}
        if is_upcycled(net_config):
            net_config, injected = _upcycled_arguments(net_config, dm.tokenizer)
        net = build(net_config, what="model", **injected)
        return net, net_config
    assert isinstance(dm, RecDataModule)
    spec_node = {"_target_": "mtl.data.spec.FeatureSpec.from_dict", "data": dm.spec.to_dict()}
    embedding_config = {**plain(cfg.embedding), "spec": spec_node}
    embedding = build(embedding_config, what="embedding")
    model_config = {
        **plain(cfg.model),
        "d_in": embedding.output_dim,
        "tasks": dm.spec.task_names,
    }
    model = build(model_config, what="model")
    if isinstance(model, ESMM):
        # The data module does not know the model; ESMM's pCTCVR = pCTR * pCVR cannot fit
        # a conversion without a click, so such labels are refused here.
        thens = [model.ctcvr_task] + ([model.cvr_task] if model.cvr_task in model.tasks else [])
        check_label_cascade(dm, first=model.ctr_task, then=thens, model="ESMM")
    net = Ranker(embedding=embedding, model=model)
    net_config = {
        "_target_": "mtl.models.rec.ranker.Ranker",
        "embedding": embedding_config,
        "model": model_config,
    }
    return net, net_config


def _upcycled_arguments(
    node: dict[str, Any], tokenizer: Tokenizer | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An upcycled LM's config and the weights to inject: ``init_checkpoint`` is read here,
    the model takes plain arguments (a ``dense`` node without Hydra keys, ``dense_state``)."""
    try:
        plain_node = upcycled_config(node)
        # The weights a model starts from are no part of its structure: a reload of this
        # run's checkpoint takes them from the checkpoint, not from the file named here.
        path = plain_node.pop("init_checkpoint", None)
        if path is None:
            return plain_node, {}
        return plain_node, {"dense_state": dense_weights(path, tokenizer=tokenizer)}
    except ValueError as exc:  # a bad dense node, CheckpointError, VocabularyMismatchError
        message = " ".join(str(exc).split())
        raise ConfigError(f"could not build model ({node.get('_target_')}): {message}") from exc


def _takes_tokenizer(node: Mapping[str, Any]) -> bool:
    """Whether ``node``'s target has a ``tokenizer`` argument (the run's tokenizer)."""
    try:
        params = inspect.signature(get_object(str(node.get("_target_")))).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return False  # build() reports a bad target
    return "tokenizer" in params


def build_module(cfg: DictConfig, dm: DataModule) -> Module:
    """The LightningModule of ``cfg.kind`` around the network :func:`build_net` builds."""
    if cfg.kind not in ("rec", "lm"):
        raise ConfigError(f"kind must be 'rec' or 'lm', got {cfg.kind!r}")
    net, net_config = build_net(cfg, dm)
    optimizer = build(cfg.optim, what="optim") if cfg.get("optim") else None
    scheduler = build(cfg.scheduler, what="scheduler") if cfg.get("scheduler") else None
    if isinstance(net, TransformerLM):
        assert isinstance(dm, TextDataModule)
        return LMModule(
            net=net,
            tokenizer=dm.tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            net_config=net_config,
        )
    return RecModule(
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        task_weights=plain(cfg.get("task_weights")),
        seed=int(cfg.seed),
        diagnostics=bool(cfg.get("diagnostics", True)),
        net_config=net_config,
    )


def build_callbacks(cfg: DictConfig, *, monitor: str, mode: str) -> list[pl.Callback]:
    """Every non-null node of ``cfg.callbacks``; ``monitor``/``mode`` ``"auto"`` get the run's.

    A progress bar is left out when ``trainer.enable_progress_bar`` is false
    (Lightning refuses the two together).
    """
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        given = {
            key: value
            for key, value in (("monitor", monitor), ("mode", mode))
            if node.get(key) == "auto"
        }
        callbacks.append(build(node, what=f"callbacks.{name}", **given))
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Every non-null node of ``cfg.logger``."""
    return [
        build(node, what=f"logger.{name}")
        for name, node in (cfg.get("logger") or {}).items()
        if node is not None
    ]


def load_module(
    path: str | Path, *, map_location: str = "cpu", net: nn.Module | None = None
) -> Module:
    """Rebuild the module (and network) a run saved in checkpoint ``path``, with its weights.

    The file is read with ``weights_only=True`` and its ``net_config`` may name only
    classes of the ``mtl`` package (:mod:`mtl.training.safe_load`): loading runs no
    code named in the file.

    A network built or changed in Python (e.g. upcycled with
    :func:`~mtl.models.lm.upcycle_transformer`) has no ``net_config`` that builds
    it: pass it as ``net``, made with the same structure (its weights are replaced
    by the checkpoint's).

    Args:
        path: the checkpoint file.
        map_location: device of the loaded tensors.
        net: the network to load the weights into instead of the one ``net_config``
            builds; needed when the checkpoint has no ``net_config``.

    Raises:
        CheckpointError: the file is unreadable, names a ``_target_`` outside the
            library, or holds weights its ``net_config`` does not build (one line
            naming ``path``).

    Example:
        >>> module = load_module("runs/lm_mixtral/.../checkpoints/last.ckpt")  # doctest: +SKIP
        >>> print(module.generate("ROMEO:", max_new_tokens=100))  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    net_config = (checkpoint.get("hyper_parameters") or {}).get("net_config")
    if net is None and net_config is None:
        raise ValueError(
            f"checkpoint {path} has no net_config (its network was built in Python): "
            "pass a network of the same structure, load_module(path, net=...)"
        )
    if net is None:
        # The file is data: only the library's own classes are built from it.
        check_trusted_targets(net_config, source=f"checkpoint {path}")
        if is_upcycled(net_config):  # a stored dense node may carry its Hydra keys
            net_config = upcycled_config(net_config)
        net = build(net_config, what="net")
    if not isinstance(net, Ranker | TransformerLM):
        raise ValueError(f"checkpoint {path} builds a {type(net).__name__}, not a network of mtl")
    cls = LMModule if isinstance(net, TransformerLM) else RecModule
    try:
        return cls.load_from_checkpoint(
            str(path), map_location=map_location, weights_only=True, net=net
        )
    except RuntimeError as exc:
        if "loading state_dict" not in str(exc):
            raise
        raise state_dict_mismatch(path, exc) from exc


def build_lm(config: Mapping[str, Any], *, vocab_size: int) -> TransformerLM:
    """A language model from a ``conf/model/lm_*.yaml`` mapping, for ``vocab_size`` tokens.

    An upcycled model's ``init_checkpoint`` is read as a run reads it, less the
    tokenizer check (there is no run's tokenizer to compare with).

    Example:
        >>> lm = build_lm({"_target_": "mtl.models.lm.TransformerLM", "d_model": 16,
        ...                "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_seq_len": 8}, vocab_size=11)
        >>> lm.vocab_size
        11
    """
    node = {**plain(config), "vocab_size": vocab_size}
    node, injected = _upcycled_arguments(node, None) if is_upcycled(node) else (node, {})
    return build(node, what="model", **injected)
