"""Loading a checkpoint without running code named in it.

A checkpoint keeps the ``net_config`` that built its network (``_target_`` nodes),
so that :func:`mtl.training.build.load_module` can rebuild the network from the
file alone. ``hydra.utils.instantiate`` calls whatever a ``_target_`` names, so a
crafted file could name ``builtins.exec`` or ``os.system``; and ``torch.load``
without ``weights_only=True`` unpickles arbitrary objects. Here:

- :func:`mtl.training.checkpoints.read_checkpoint` reads with
  ``torch.load(weights_only=True)`` (tensors and plain values only), with one-line
  errors naming the file;
- :func:`check_trusted_targets` refuses, before anything is built, every
  ``_target_`` that is not a class of the ``mtl`` package (or a classmethod of
  one, e.g. ``mtl.data.spec.FeatureSpec.from_dict``). The target is resolved and
  the object checked, not the string: ``mtl.cli.os.system`` starts with ``mtl.``
  but is ``os.system``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mtl.training.checkpoints import CheckpointError

TRUSTED_PACKAGE = "mtl"
"""Classes whose ``__module__`` is this package or below it may be built from a file."""


class UntrustedTargetError(CheckpointError):
    """A stored config names a ``_target_`` that is not one of the library's classes."""


def _in_package(module: str | None) -> bool:
    return module is not None and (
        module == TRUSTED_PACKAGE or module.startswith(TRUSTED_PACKAGE + ".")
    )


def _locate(target: str) -> Any:
    """The object a dotted ``mtl.`` path names, importing only modules of the package.

    Raises:
        LookupError: the path names nothing.
    """
    parts = target.split(".")
    if parts[0] != TRUSTED_PACKAGE or not all(p.isidentifier() for p in parts):
        raise LookupError(target)
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(name)
            break
        except ModuleNotFoundError as exc:
            # Only "this prefix is not a module" means try a shorter one; a module of
            # the package that fails to import is a real error.
            if exc.name is None or not name.startswith(exc.name):
                raise
    else:  # pragma: no cover - the package itself always imports
        raise LookupError(target)
    for attr in parts[i:]:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise LookupError(target) from None
    return obj


def is_trusted_target(target: str, extra: Collection[str] = ()) -> bool:
    """Whether ``target`` names a class of the ``mtl`` package, or a classmethod of one.

    Args:
        target: a ``_target_`` string.
        extra: exact target strings also allowed (e.g. ``{"torch.optim.Adam"}``).

    Example:
        >>> is_trusted_target("mtl.models.rec.MMoE"), is_trusted_target("builtins.exec")
        (True, False)
        >>> is_trusted_target("mtl.cli.os.system")  # an import of os inside mtl.cli
        False
    """
    if target in extra:
        return True
    try:
        obj = _locate(target)
    except LookupError:
        return False
    if inspect.isclass(obj):
        return _in_package(obj.__module__)
    if inspect.ismethod(obj) and inspect.isclass(obj.__self__):
        return _in_package(obj.__self__.__module__) and _in_package(obj.__func__.__module__)
    return False


def check_trusted_targets(node: Any, *, source: str, extra: Collection[str] = ()) -> None:
    """Raise unless every ``_target_`` in the nested ``node`` passes :func:`is_trusted_target`.

    Args:
        node: a config as plain dicts and lists (e.g. a checkpoint's ``net_config``).
        source: what the config came from, for the message (``"checkpoint runs/x/last.ckpt"``).
        extra: exact target strings also allowed.

    Raises:
        UntrustedTargetError: one line naming the target, its key and ``source``.

    Example:
        >>> check_trusted_targets({"_target_": "mtl.models.rec.MMoE",
        ...     "gate": {"_target_": "builtins.exec"}}, source="x.ckpt")
        Traceback (most recent call last):
        ...
        mtl.training.safe_load.UntrustedTargetError: x.ckpt names _target_ 'builtins.exec' at gate._target_; ...
    """
    for key, target in _targets(node, ""):
        if not isinstance(target, str) or not is_trusted_target(target, extra):
            raise UntrustedTargetError(
                f"{source} names _target_ {target!r} at {key}; only classes of the "
                f"{TRUSTED_PACKAGE} package are built from a file, so it was not loaded"
            )


def _targets(node: Any, key: str) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``_target_`` in ``node``, outermost first."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        if "_target_" in node:
            found.append((f"{key}._target_" if key else "_target_", node["_target_"]))
        for k, v in node.items():
            if k != "_target_":
                found += _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found += _targets(v, f"{key}[{i}]")
    return found


def state_dict_mismatch(path: str | Path, exc: RuntimeError) -> CheckpointError:
    """One line for ``load_state_dict``'s multi-line mismatch report on checkpoint ``path``.

    Example:
        >>> state_dict_mismatch("a.ckpt", RuntimeError("Error(s) in loading state_dict for M:\\n\\t"
        ...     'Missing key(s) in state_dict: "w".'))
        CheckpointError('checkpoint a.ckpt does not match the network its net_config builds: Missing key(s) in state_dict: "w".')
    """
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    detail = " ".join(lines) or str(exc)
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return CheckpointError(
        f"checkpoint {path} does not match the network its net_config builds: {detail}"
    )
