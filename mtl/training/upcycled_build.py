"""The plain arguments of an upcycled LM from its config node (``conf/model/lm_upcycled.yaml``).

:class:`~mtl.models.lm.upcycled.UpcycledLM` takes the dense model's keyword
arguments and, optionally, its weights. The config describes the dense model with
the ``lm_dense`` node (``_target_`` and all) and the weights with the path of a
dense run's checkpoint, ``init_checkpoint``: :func:`upcycled_config` turns the
first into keyword arguments and :func:`dense_weights` reads the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from torch import Tensor

from mtl.data.tokenizers import Tokenizer
from mtl.models.lm.lora import check_base_tokenizer
from mtl.models.lm.upcycled import UpcycledLM
from mtl.training.checkpoints import read_checkpoint

DENSE_TARGETS = ("mtl.models.lm.TransformerLM", "mtl.models.lm.transformer.TransformerLM")
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")


def is_upcycled(node: Mapping[str, Any]) -> bool:
    """Whether config ``node`` builds an :class:`~mtl.models.lm.upcycled.UpcycledLM`.

    Example:
        >>> is_upcycled({"_target_": "mtl.models.lm.upcycled.UpcycledLM"})
        True
        >>> is_upcycled({"_target_": "mtl.models.lm.TransformerLM"})
        False
    """
    target = node.get("_target_")
    if not isinstance(target, str):
        return False
    try:
        obj = get_object(target)
    except (ImportError, ValueError, AttributeError):
        return False  # building it reports the bad target
    return isinstance(obj, type) and issubclass(obj, UpcycledLM)


def upcycled_config(node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with its ``dense`` node as plain :class:`~mtl.models.lm.TransformerLM` arguments.

    The dense node's ``_target_`` must be ``TransformerLM`` (or absent); its Hydra
    keys, ``vocab_size`` and a null ``max_seq_len`` go (the upcycled model sets those),
    so does a null ``moe``. Applying it twice changes nothing.

    Raises:
        ValueError: ``dense`` describes another class or a model with MoE layers.

    Example:
        >>> node = {"_target_": "mtl.models.lm.upcycled.UpcycledLM", "num_experts": 4,
        ...         "dense": {"_target_": "mtl.models.lm.TransformerLM", "vocab_size": None,
        ...                   "max_seq_len": None, "d_model": 16, "moe": None}}
        >>> upcycled_config(node)["dense"]
        {'d_model': 16}
    """
    dense = dict(node.get("dense") or {})
    target = dense.get("_target_")
    if target is not None and target not in DENSE_TARGETS:
        raise ValueError(f"dense must describe a TransformerLM, got _target_={target!r}")
    if dense.get("moe") is not None:
        raise ValueError("dense must describe a dense model (moe: null) to upcycle")
    drop = {*HYDRA_KEYS, "moe", "vocab_size"}
    if dense.get("max_seq_len") is None:
        drop.add("max_seq_len")
    return {**node, "dense": {key: value for key, value in dense.items() if key not in drop}}


def dense_weights(
    path: str | Path, *, tokenizer: Tokenizer | None = None, key: str = "model.init_checkpoint"
) -> dict[str, Tensor]:
    """The dense network's weights in a run's checkpoint ``path`` (its ``net.*`` entries).

    Args:
        path: a checkpoint of a dense run (``mtl train experiment=lm_dense``).
        tokenizer: the run's tokenizer; the checkpoint's, where it has one, must be
            the same vocabulary (fingerprint), not only the same size.
        key: the config key that named ``path``, for the error messages.

    Raises:
        CheckpointError: ``path`` is missing or unreadable, or has no ``state_dict``.
        VocabularyMismatchError: the checkpoint was trained with another tokenizer.
    """
    checkpoint = read_checkpoint(path, role=key, require=("state_dict",))
    saved = checkpoint.get("lm_tokenizer")
    if tokenizer is not None and saved is not None:
        check_base_tokenizer(saved, tokenizer, key=key, path=path)
    state = checkpoint["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
