"""Adapter files: the adapters of a LoRA model, and what they were trained on.

An adapter file (:func:`save_adapters`) holds the adapter tensors, the base
parameters trained along with them (``train_also``, e.g. the routers), the
:class:`~mtl.models.lm.lora.LoRAConfig` that adds the adapters, and two marks of the
base they were trained on: its tokenizer's fingerprint and a short hash of a
few frozen base weights. :func:`load_adapters` checks everything (format,
adapter names and shapes, tokenizer, base weights) before it changes the model,
so a refused file leaves the model as it was: adapters of another base of the
same shapes would load without error and give a model that is neither.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mtl.data.tokenizers import Tokenizer
    from mtl.models.lm.lora import LoRAConfig

ADAPTER_FORMAT = "mtl-lora-adapters/1"
"""The ``format`` entry of an adapter file (:func:`save_adapters`)."""

BASE_HASH_TENSORS = 4
"""How many base parameters the base hash reads (evenly spread over the sorted names)."""

_HASH_ELEMENTS = 1 << 16
"""At most this many elements of each hashed tensor (evenly strided), to keep the hash cheap."""


def base_weights_hash(model: nn.Module, names: list[str]) -> str:
    """16 hex digits of sha256 over the names, shapes and (sampled) values of base tensors ``names``.

    Values are hashed as float32, so a base loaded in another float dtype of the
    same values hashes the same. Raises ``KeyError`` for a name the model lacks.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> len(base_weights_hash(lin, ["weight"]))
        16
    """
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        t = params[name].detach()
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // _HASH_ELEMENTS)][:_HASH_ELEMENTS]
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(sample.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _trained_along(model: nn.Module) -> dict[str, Tensor]:
    """The base parameters left trainable beside the adapters (``train_also``); none when
    nothing of the base is frozen (then the file holds adapters only)."""
    base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in f".{n}"]
    if all(p.requires_grad for _, p in base):
        return {}
    return {n: p.detach().cpu().clone() for n, p in base if p.requires_grad}


def _hashed_names(model: nn.Module) -> list[str]:
    """The base parameters the hash reads: the frozen ones (all base ones if none is frozen)."""
    base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in f".{n}"]
    # parameters kept trainable (train_also) changed during fine-tuning: the base has the old values
    frozen = sorted(n for n, p in base if not p.requires_grad) or sorted(n for n, _ in base)
    if len(frozen) <= BASE_HASH_TENSORS:
        return frozen
    step = (len(frozen) - 1) / (BASE_HASH_TENSORS - 1)
    return sorted({frozen[round(i * step)] for i in range(BASE_HASH_TENSORS)})


def save_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    config: LoRAConfig,
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write the adapters of ``model``, the config that adds them and marks of its base.

    Args:
        model: a model with adapters.
        path: the file to write.
        config: the :class:`~mtl.models.lm.lora.LoRAConfig` that adds the adapters.
        tokenizer: the base's tokenizer; its fingerprint is stored (None: not stored).
    """
    from mtl.models.lm.lora import lora_state_dict

    names = _hashed_names(model)
    base = {
        "tokenizer_fingerprint": None if tokenizer is None else tokenizer.fingerprint(),
        "weights_hash": base_weights_hash(model, names),
        "hashed": names,
    }
    blob = {
        "format": ADAPTER_FORMAT,
        "config": config.to_dict(),
        "state": lora_state_dict(model),
        "trained_along": _trained_along(model),
        "base": base,
    }
    torch.save(blob, Path(path))


def load_adapters(
    model: nn.Module, path: str | Path, *, tokenizer: Tokenizer | None = None
) -> LoRAConfig:
    """Add the adapters of file ``path`` (:func:`save_adapters`) to a base ``model`` and load them.

    Args:
        model: the base model, without adapters; unchanged when this raises.
        path: an adapter file.
        tokenizer: the base's tokenizer, compared with the fingerprint the file
            stores (None: not compared).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is unreadable or not an adapter file, its adapters
            do not fit the model (names or shapes), or it was trained on another
            base (tokenizer fingerprint or base weights differ).
    """
    from mtl.models.lm.lora import LoRAConfig, _replace, adapted_modules

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file {path}")
    blob = _read(path)
    cfg = blob["config"]
    config = LoRAConfig(rank=cfg["rank"], alpha=cfg["alpha"], targets=tuple(cfg["targets"]))
    built = adapted_modules(model, rank=config.rank, alpha=config.alpha, targets=config.targets)
    own = {
        f"{name}.{key}": value
        for name, module in built
        for key, value in module.state_dict().items()
        if ".lora_" in f".{key}"
    }
    _check_adapter_shapes(path, own, blob["state"])
    _check_base(path, model, blob.get("base"), tokenizer)
    along = blob.get("trained_along") or {}
    params = dict(model.named_parameters())
    for name, value in along.items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(
                f"{path}: the model has no parameter {name} of shape {tuple(value.shape)}, "
                "which was trained along with the adapters"
            )
    for name, module in built:
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in blob["state"].items() if k.startswith(prefix)},
            strict=False,
        )
    for name, module in built:
        _replace(model, name, module)
    with torch.no_grad():
        for name, value in along.items():
            params[name].copy_(value)
    return config


def _read(path: Path) -> dict[str, Any]:
    """The adapter file's contents; an unreadable or foreign file is a ``ValueError`` naming it."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"{path}: cannot read the adapter file (truncated or not a torch file?): {detail}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an adapter file (format {ADAPTER_FORMAT!r} expected)")
    return blob


def _check_adapter_shapes(
    path: Path, own: Mapping[str, Tensor], saved: Mapping[str, Tensor]
) -> None:
    """The file's adapter tensors must be the model's, by name and shape."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        raise ValueError(
            f"{path}: the adapters do not match the model's: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for name in sorted(own):
        want, got = tuple(own[name].shape), tuple(saved[name].shape)
        if want != got:
            raise ValueError(
                f"{path}: adapter {name} has shape {got} in the file but {want} on this model "
                "(a base of other widths)"
            )


def _check_base(
    path: Path, model: nn.Module, base: Mapping[str, Any] | None, tokenizer: Tokenizer | None
) -> None:
    """Refuse adapters trained on another base; files without the marks load with a warning."""
    if base is None:
        warnings.warn(
            f"{path} was written without the marks of its base (tokenizer fingerprint, "
            "base weights hash): it cannot be checked against this model",
            stacklevel=3,
        )
        return
    saved_fp = base.get("tokenizer_fingerprint")
    if saved_fp is not None and tokenizer is not None and saved_fp != tokenizer.fingerprint():
        raise ValueError(
            f"{path}: the adapters were trained on a base with tokenizer fingerprint {saved_fp}; "
            f"this model's tokenizer has {tokenizer.fingerprint()} (another vocabulary)"
        )
    names = list(base["hashed"])
    try:
        got = base_weights_hash(model, names)
    except KeyError as exc:
        raise ValueError(
            f"{path}: this model has no base tensor {exc} the adapters' base had"
        ) from None
    if got != base["weights_hash"]:
        raise ValueError(
            f"{path}: the adapters were trained on another base: base weights hash "
            f"{base['weights_hash']} in the file, {got} on this model (over {', '.join(names)})"
        )
