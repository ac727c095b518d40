"""Fair sizes for ``mtl compare``: each model's parameter count, and widths scaled to match.

A model's *widths* are the list-valued ``*_hidden`` keys of its config
(``expert_hidden``, ``tower_hidden``, ``bottom_hidden``) and HoME's ``lora_rank``;
its *sizes* are the widths plus every ``num_*`` key (``num_experts``,
``num_shared_experts``, ``num_levels``, ...). Parameters are counted on the network
:func:`mtl.training.build.build_net` builds on the data's feature spec, without the
embeddings (every model shares the same embedding tables, so they would only dilute
the difference).

With ``match_params=true`` every model's widths are multiplied by one common factor
(each width rounded to an integer >= 1), found by bisection on the real parameter
count, so that all models are within :data:`TOLERANCE` of one reference count: the
``match_params_to`` count when given, else the first model's count with its own
widths (the first model is then left unchanged). Expert counts and depths are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.training.build import DataModule, build_net, plain
from mtl.training.config import ConfigError

TOLERANCE = 0.05
"""Largest relative distance of a matched model's count to the reference count."""
SCALAR_WIDTHS = ("lora_rank",)
"""Integer width keys that are not ``*_hidden`` lists."""
_MAX_DOUBLINGS = 20


def width_keys(model: Mapping[str, Any]) -> list[str]:
    """The keys of ``model`` that :func:`scale_widths` scales.

    Example:
        >>> width_keys({"num_experts": 4, "expert_hidden": [8], "tower_hidden": [], "lora_rank": 2})
        ['expert_hidden', 'tower_hidden', 'lora_rank']
    """
    return [
        key
        for key, value in model.items()
        if (key.endswith("_hidden") and isinstance(value, list | tuple))
        or (key in SCALAR_WIDTHS and isinstance(value, int))
    ]


def model_sizes(model: Mapping[str, Any]) -> dict[str, Any]:
    """The widths and ``num_*`` counts of a model config, in the config's order.

    Example:
        >>> model_sizes({"_target_": "M", "num_experts": 4, "expert_hidden": [8], "dropout": 0.1})
        {'num_experts': 4, 'expert_hidden': [8]}
    """
    widths = set(width_keys(model))
    return {
        key: plain(value)
        for key, value in model.items()
        if key in widths or (key.startswith("num_") and isinstance(value, int))
    }


def scale_widths(model: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``{key: width * factor}`` for every width key, each rounded to an integer >= 1.

    Example:
        >>> scale_widths({"expert_hidden": [64, 32], "tower_hidden": [3], "lora_rank": 8}, 0.25)
        {'expert_hidden': [16, 8], 'tower_hidden': [1], 'lora_rank': 2}
    """
    scaled: dict[str, Any] = {}
    for key in width_keys(model):
        value = model[key]
        if isinstance(value, int):
            scaled[key] = max(1, round(value * factor))
        else:
            scaled[key] = [max(1, round(int(w) * factor)) for w in value]
    return scaled


def count_params(cfg: DictConfig, dm: DataModule, widths: Mapping[str, Any] | None = None) -> int:
    """Trainable parameters of ``cfg``'s network without its embeddings, ``widths`` merged in."""
    if widths:
        cfg = cfg.copy()
        cfg.model = OmegaConf.merge(cfg.model, dict(widths))
    net, _ = build_net(cfg, dm)
    return sum(p.numel() for p in net.model.parameters() if p.requires_grad)


def match_widths(
    cfg: DictConfig, dm: DataModule, target: int, *, name: str = "model"
) -> tuple[dict[str, Any], int, float]:
    """Widths of ``cfg.model`` scaled by one factor so its count is within 5% of ``target``.

    The factor is bracketed by doubling or halving from 1, then bisected; the
    closest count seen wins (so the counts are usually far closer than 5%).

    Args:
        cfg: a run config (``kind: rec``) with the model's own overrides merged.
        dm: the prepared data module whose feature spec the network is built on.
        target: the parameter count to reach (without embeddings).
        name: the model's name in the error message.

    Returns:
        ``(widths, count, factor)``: the scaled width keys, the count they give and the factor.

    Raises:
        ConfigError: the model has no width to scale, or no factor comes within 5%.
    """
    model = plain(cfg.model)
    if not width_keys(model):
        raise ConfigError(f"match_params: model {name!r} has no *_hidden width to scale")
    seen: dict[float, int] = {}

    def count(factor: float) -> int:
        if factor not in seen:
            seen[factor] = count_params(cfg, dm, scale_widths(model, factor))
        return seen[factor]

    def close(n: int) -> bool:
        return abs(n - target) <= TOLERANCE * target

    lo = hi = 1.0
    steps = 0
    # Bracket: count(lo) <= target <= count(hi); the count grows with the factor. Below
    # lo = 0.5 / (largest width) every width rounds to 1, so halving further changes nothing.
    while count(hi) < target and steps < _MAX_DOUBLINGS:
        lo, hi, steps = hi, hi * 2, steps + 1
    floor = 0.5 / max(1, max_width(model))
    while count(lo) > target and lo > floor:
        hi, lo = lo, lo / 2
    # Rounding makes the count a step function: bisect until the bracket is narrower than
    # an eighth of a unit of the largest width (a finer factor barely moves the count).
    while target not in (count(lo), count(hi)) and (hi - lo) > floor / 8:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    factor = min(seen, key=lambda f: abs(seen[f] - target))
    if not close(seen[factor]):
        raise ConfigError(
            f"match_params: model {name!r} cannot reach {target} parameters within "
            f"{TOLERANCE:.0%} by scaling its widths {width_keys(model)} "
            f"(closest: {seen[factor]} at factor {factor:.3g})"
        )
    return scale_widths(model, factor), seen[factor], factor


def max_width(model: Mapping[str, Any]) -> int:
    """The largest width of ``model`` (0 without widths)."""
    values = [
        model[k] if isinstance(model[k], int) else max(model[k], default=0)
        for k in width_keys(model)
    ]
    return max(values, default=0)


def fair_sizes(
    configs: Mapping[str, DictConfig],
    dm: DataModule,
    *,
    match: bool = False,
    match_to: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: parameter count, sizes and scale, widths matched when ``match``.

    Args:
        configs: ``{model name: run config}`` in the comparison's order, each with
            the model's overrides merged.
        dm: the prepared data module shared by the runs.
        match: scale every model's widths to the reference count.
        match_to: the reference count; ``None`` = the first model's count.

    Returns:
        ``{name: {"params", "scale", "sizes", "widths", "config"}}``: ``params`` without
        embeddings, ``widths`` the width overrides to merge into the model config
        (empty when unchanged), ``config`` the model config the runs use.

    Raises:
        ConfigError: a model cannot be matched within 5% (one line naming it).

    Example:
        >>> sizes = fair_sizes({"mmoe": cfg_a, "home": cfg_b}, dm, match=True)  # doctest: +SKIP
        >>> sizes["home"]["params"], sizes["home"]["sizes"]["expert_hidden"]  # doctest: +SKIP
        (20480, [37])
    """
    if match_to is not None and int(match_to) < 1:
        raise ConfigError(f"match_params_to must be a parameter count >= 1, got {match_to}")
    out: dict[str, dict[str, Any]] = {}
    target = None if match_to is None else int(match_to)
    for name, cfg in configs.items():
        widths: dict[str, Any] = {}
        params, scale = count_params(cfg, dm), 1.0
        if match and target is None:
            target = params  # the first model is the reference and keeps its widths
        elif match:
            assert target is not None
            widths, params, scale = match_widths(cfg, dm, target, name=name)
        model = OmegaConf.to_container(OmegaConf.merge(cfg.model, widths), resolve=True)
        assert isinstance(model, dict)
        out[name] = {
            "params": params,
            "scale": scale,
            "sizes": model_sizes(model),
            "widths": widths,
            "config": model,
        }
    return out
