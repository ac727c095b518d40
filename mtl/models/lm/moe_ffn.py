"""Build an MoE feed-forward layer (:class:`mtl.moe.MoELayer`) from a config mapping.

A *spec* names the layer's parts; each part is a Hydra-style mapping with a
``_target_`` (instantiated with ``d_model`` injected when the target accepts
it), a callable factory, or a module instance used as a template (deep-copied
for every layer, so layers never share weights)::

    moe:
      num_experts: 8          # variables for ${..num_experts} interpolation
      k: 2
      gate: {_target_: mtl.moe.TopKGate, num_experts: ${..num_experts}, k: ${..k}, renormalize: true}
      experts: {_target_: mtl.moe.ExpertBank.swiglu, num_experts: ${..num_experts}, d_hidden: 64}
      dispatch: {_target_: mtl.moe.DroplessDispatch}
      shared: null            # or an ExpertBank spec: always-on experts (DeepSeekMoE)
      aux_loss_weights: {load_balance: 0.01, z_loss: 0.001}
      output_scale: 1.0

Variable keys (:data:`SPEC_VARIABLES`) are there only to be interpolated and are
ignored by the builder; any other unknown key is an error (a typo would
otherwise silently fall back to a default).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from mtl.config_values import to_plain
from mtl.moe import DroplessDispatch, MoELayer

SPEC_PARTS = ("gate", "experts", "dispatch", "shared", "aux_loss_weights", "output_scale")
"""Keys of an MoE spec that the builder uses."""

SPEC_VARIABLES = ("num_experts", "k", "d_expert", "num_shared", "capacity_factor", "top_p")
"""Keys of an MoE spec kept for interpolation only."""

MoESpec = Mapping[str, Any]


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    # only an explicit parameter: nn.Module subclasses without __init__ show (*args, **kwargs)
    return name in params


def build_part(part: Any, *, d_model: int) -> Any:
    """Instantiate one part of a spec for one layer.

    Args:
        part: ``{"_target_": ...}`` mapping, a callable factory, an ``nn.Module``
            template (deep-copied) or None.
        d_model: injected as ``d_model=`` where the target accepts it.

    Returns:
        The new object (None for None).
    """
    if part is None:
        return None
    if isinstance(part, nn.Module):
        return copy.deepcopy(part)
    if isinstance(part, Mapping):
        if "_target_" not in part:
            raise ValueError(f"an MoE part mapping needs a '_target_', got keys {sorted(part)}")
        from hydra.utils import get_object, instantiate

        target = get_object(part["_target_"])
        extra = (
            {"d_model": d_model} if _accepts(target, "d_model") and "d_model" not in part else {}
        )
        return instantiate(dict(part), **extra)
    if callable(part):
        return part(d_model=d_model) if _accepts(part, "d_model") else part()
    raise TypeError(f"cannot build an MoE part from {type(part).__name__}: {part!r}")


def build_moe_ffn(spec: MoESpec, *, d_model: int) -> MoELayer:
    """Build a fresh :class:`~mtl.moe.MoELayer` from a spec (see the module docstring).

    Args:
        spec: mapping (dict or OmegaConf) with ``gate`` and ``experts`` required;
            ``dispatch`` defaults to :class:`~mtl.moe.DroplessDispatch`.
        d_model: model width, injected into the parts.

    Returns:
        A new MoELayer (fresh parameters on every call).

    Example:
        >>> spec = {
        ...     "gate": {"_target_": "mtl.moe.TopKGate", "num_experts": 4, "k": 2},
        ...     "experts": {"_target_": "mtl.moe.ExpertBank.swiglu", "num_experts": 4, "d_hidden": 16},
        ... }
        >>> build_moe_ffn(spec, d_model=8).num_experts
        4
    """
    spec = to_plain(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"an MoE spec must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - set(SPEC_PARTS) - set(SPEC_VARIABLES)
    if unknown:
        raise ValueError(
            f"unknown MoE spec keys {sorted(unknown)}; parts: {list(SPEC_PARTS)}, "
            f"interpolation variables: {list(SPEC_VARIABLES)}"
        )
    for required in ("gate", "experts"):
        if spec.get(required) is None:
            raise ValueError(f"an MoE spec needs '{required}'")
    gate = build_part(spec["gate"], d_model=d_model)
    experts = build_part(spec["experts"], d_model=d_model)
    dispatch = build_part(spec.get("dispatch"), d_model=d_model) or DroplessDispatch()
    shared = build_part(spec.get("shared"), d_model=d_model)
    return MoELayer(
        gate=gate,
        experts=experts,
        dispatch=dispatch,
        shared=shared,
        aux_loss_weights=dict(spec.get("aux_loss_weights") or {}),
        output_scale=float(spec.get("output_scale", 1.0)),
    )


def active_experts_per_token(gate: nn.Module) -> float | None:
    """Expected number of routed experts a token uses, or None when it varies.

    ``k`` for token-choice gates, the capacity factor for expert choice (tokens
    per expert ``= c T / E``, so ``c`` experts per token on average); None for
    top-p, whose count depends on the router's confidence.
    """
    from mtl.moe import ExpertChoiceGate, TopPGate

    if isinstance(gate, TopPGate):
        return None
    if isinstance(gate, ExpertChoiceGate):
        return float(gate.capacity_factor)
    k = getattr(gate, "k", None)
    return None if k is None else float(k)
