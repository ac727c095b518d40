"""``torch.compile`` for the trained model, switched on by the ``compile`` config key.

``compile: false`` (the default) trains eagerly. ``compile: true`` compiles the
model's forward with inductor; a mapping passes its keys to ``torch.compile``
(``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``), e.g.
``compile: {mode: max-autotune-no-cudagraphs}``.

The model is compiled in place (:meth:`torch.nn.Module.compile`), so its
``state_dict`` keys and therefore its checkpoints are the same as eager ones,
and a run can be resumed with or without compilation.

What compiles: the MoE layers' routers, auxiliary losses and statistics are
traced; the dropless dispatch runs eagerly between the compiled graphs (its
row layout is sized from per-expert counts read back to the host, which would
recompile the graph at every new routing). Whether it pays off depends on the
model and the device: on the 2-core CPU of ``benchmarks/RESULTS.md`` the LM
presets gained a little and the recommender models lost (inductor's CPU
batch-norm code), so measure first: ``benchmarks/lm_train.py --compile``,
``benchmarks/rec_train.py --variants mtl mtl_compile``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

COMPILE_KEYS = frozenset({"backend", "mode", "dynamic", "fullgraph", "options"})
"""The ``torch.compile`` keyword arguments a ``compile`` mapping may set."""


def compile_options(value: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments a ``compile`` config value asks for.

    Args:
        value: ``None``/``False`` (eager), ``True`` (inductor defaults) or a
            mapping of :data:`COMPILE_KEYS`.

    Returns:
        None for eager, else the keyword arguments (``{}`` for the defaults).

    Raises:
        ValueError: a value of another type, or a key ``torch.compile`` does not take here.

    Example:
        >>> compile_options(True), compile_options(False)
        ({}, None)
        >>> compile_options({"backend": "aot_eager"})
        {'backend': 'aot_eager'}
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in COMPILE_KEYS)
        if unknown:
            raise ValueError(
                f"compile: unknown key(s) {unknown}; expected some of {sorted(COMPILE_KEYS)}"
            )
        return {str(k): v for k, v in value.items()}
    raise ValueError(
        f"compile must be true, false or a mapping of torch.compile arguments "
        f"{sorted(COMPILE_KEYS)}, got {value!r} ({type(value).__name__})"
    )


def compile_model(model: nn.Module, value: Any) -> bool:
    """Compile ``model`` in place as the ``compile`` config value says.

    Args:
        model: the module to compile (its ``state_dict`` keys do not change).
        value: the ``compile`` config value (see :func:`compile_options`).

    Returns:
        whether the model was compiled.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> compile_model(layer, False)
        False
        >>> compile_model(layer, {"backend": "eager"}), list(layer.state_dict())
        (True, ['weight', 'bias'])
    """
    options = compile_options(value)
    if options is None:
        return False
    model.compile(**options)
    return True
