"""Checkpoints a run can trust: checked before a resume, saved or failed loudly.

:func:`check_resume_checkpoint` reads the checkpoint a run resumes from
(``torch.load(weights_only=True)``: tensors and plain values only) and checks it
against the run's own module before anything in the run folder is touched: the
network config (model ``_target_`` and settings, the feature spec with its
vocabularies, or the LM's vocabulary) and every weight's name and shape. A
truncated, empty or foreign file is one :class:`CheckpointError` line naming it.

:class:`StrictCheckpointIO` saves checkpoints atomically and raises when a save
fails; Lightning's own writer swallows a ``PermissionError``, so a read-only
``checkpoints/`` trained every epoch and saved nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from mtl.training.lm_module import VocabularyMismatchError, check_vocabulary


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, belongs to another model or data, or was not saved."""


def differences(
    saved: Any, wanted: Any, key: str = "", *, names: tuple[str, str] = ("checkpoint", "config")
) -> list[str]:
    """Dotted keys where two nested configs differ, each as ``key: saved ... config ...``.

    ``names`` label the two sides (``mtl merge`` names the two files).

    Example:
        >>> differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3]})
        ['b[1]: checkpoint 2, config 3']
        >>> differences({"k": 2}, {"k": 1}, names=("a.ckpt", "b.ckpt"))
        ['k: a.ckpt 2, b.ckpt 1']
    """
    first, second = names
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        out: list[str] = []
        for k in sorted(set(saved) | set(wanted), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in saved:
                out.append(f"{sub}: not in the {first}, {second} {_short(wanted[k])}")
            elif k not in wanted:
                out.append(f"{sub}: {first} {_short(saved[k])}, not in the {second}")
            else:
                out += differences(saved[k], wanted[k], sub, names=names)
        return out
    seq = (list, tuple)
    if isinstance(saved, seq) and isinstance(wanted, seq) and len(saved) == len(wanted):
        out = []
        for i, (a, b) in enumerate(zip(saved, wanted, strict=True)):
            # A feature or task is named by its name, not its position.
            name = a.get("name") if isinstance(a, Mapping) else None
            out += differences(a, b, f"{key}[{name if name is not None else i}]", names=names)
        return out
    if saved != wanted:
        return [f"{key or 'value'}: {first} {_short(saved)}, {second} {_short(wanted)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(
    path: str | Path,
    *,
    role: str = "checkpoint",
    require: tuple[str, ...] = (),
    map_location: str = "cpu",
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with one-line errors naming ``path``.

    The one reader of checkpoint files: resuming a run and :func:`mtl.training.build.load_module`
    both go through it.

    Args:
        path: the ``.ckpt`` file.
        role: what the file is for, the first words of every error
            (``"resume checkpoint"``).
        require: top-level keys the checkpoint must hold (a resume needs Lightning's
            ``state_dict``, ``hyper_parameters`` and ``loops``).
        map_location: device to load the tensors on.

    Raises:
        CheckpointError: missing, empty, truncated, holding objects other than tensors
            and plain values, not a dict, or without a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{role} {path} is empty (0 bytes); an interrupted save?")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        # The first sentence of torch's reason; the rest is advice about other causes.
        reason = " ".join(str(exc).split()).split(". ")[0][:160]
        raise CheckpointError(
            f"{role} {path} cannot be read with weights_only=True: truncated, not a checkpoint "
            f"saved by mtl, or holding objects other than tensors and plain values "
            f"({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{role} {path} holds a {type(checkpoint).__name__}, not a dict")
    missing = [k for k in require if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{role} {path} is not a checkpoint saved by mtl train (it has no {', '.join(missing)})"
        )
    return checkpoint


def check_resume_checkpoint(path: str | Path, module: nn.Module) -> None:
    """Raise unless checkpoint ``path`` can resume ``module``, the run's freshly built module.

    Checks, in order: the file reads with ``weights_only=True``; an LM's tokenizer
    matches the data's; its ``net_config`` equals the module's (model ``_target_``
    and settings; for rankers the feature spec, with every vocabulary size); its
    weights have the module's names and shapes. Reads only.

    Args:
        path: the checkpoint (``resume=last`` resolved to ``checkpoints/last.ckpt``).
        module: the run's :class:`~mtl.training.rec_module.RecModule` or
            :class:`~mtl.training.lm_module.LMModule`, built from the config and data.

    Raises:
        CheckpointError: one line naming ``path`` and the first differences.
        VocabularyMismatchError: an LM checkpoint of another vocabulary.

    Example:
        >>> check_resume_checkpoint("runs/x/checkpoints/last.ckpt", module)  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(
        path, role="resume checkpoint", require=("state_dict", "hyper_parameters", "loops")
    )
    # An LM's vocabulary first: its message says what to do about it.
    tokenizer = getattr(module, "tokenizer", None)
    saved_tokenizer = checkpoint.get("lm_tokenizer")
    if tokenizer is not None and saved_tokenizer is not None:
        try:
            check_vocabulary(saved_tokenizer, tokenizer)
        except VocabularyMismatchError as exc:
            raise VocabularyMismatchError(f"resume checkpoint {path}: {exc}") from None

    saved = (checkpoint.get("hyper_parameters") or {}).get("net_config")
    wanted = getattr(module, "hparams", {}).get("net_config")
    if saved is None:
        raise CheckpointError(f"resume checkpoint {path} has no net_config: it cannot be checked")
    diffs = differences(saved, wanted)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(
            f"resume checkpoint {path} was trained with another model or data than this config: "
            f"{'; '.join(diffs[:3])}{more}"
        )
    state = checkpoint["state_dict"]
    own = module.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape) if k in state else 'missing'}, "
        f"model {tuple(own[k].shape) if k in own else 'missing'}"
        for k in sorted(set(state) | set(own))
        if k not in state or k not in own or tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if shapes:
        raise CheckpointError(
            f"resume checkpoint {path} does not fit the model's weights: {'; '.join(shapes[:3])}"
        )


class StrictCheckpointIO(TorchCheckpointIO):
    """Save checkpoints atomically (a temporary file, then a rename); a failed save raises.

    Lightning's writer ignores a ``PermissionError``, so a run with a read-only
    checkpoint folder trained to the end with no checkpoint. Here the run stops at
    the first failed save, naming the file. Remote paths (``s3://...``) keep
    Lightning's writer.

    Example:
        >>> trainer = pl.Trainer(plugins=[StrictCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError("StrictCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
            # The rename is atomic: a run killed mid-save leaves the previous file whole.
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not save checkpoint {path} ({exc.strerror or exc}); the run stops "
                "rather than train on without checkpoints"
            ) from None
