"""Model names used in configs (``conf/model/<name>.yaml``) mapped to classes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtl.models.rec.esmm import ESMM
from mtl.models.rec.home import HoME
from mtl.models.rec.mmoe import MMoE
from mtl.models.rec.omoe import OMoE
from mtl.models.rec.ple import PLE
from mtl.models.rec.shared_bottom import SharedBottom

MODELS: dict[str, type[nn.Module]] = {
    "shared_bottom": SharedBottom,
    "omoe": OMoE,
    "mmoe": MMoE,
    "ple": PLE,
    "esmm": ESMM,
    "home": HoME,
}
"""Registered ranking models by config name."""


def model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; ``ValueError`` listing known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate model ``name`` with keyword arguments (``d_in``, ``tasks``, hyper-parameters).

    Unknown model names and unknown hyper-parameters raise ``ValueError`` naming
    them, so a typo in a config fails before training starts.

    Example:
        >>> model = build_model("mmoe", d_in=16, tasks=["click"], num_experts=2, expert_hidden=[8])
        >>> type(model).__name__
        'MMoE'
    """
    cls = model_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"model {name!r} got unknown arguments {unknown}; accepted: {accepted}")
    return cls(**kwargs)


def build_model_from_config(
    config: Mapping[str, Any], *, d_in: int, tasks: Sequence[str]
) -> nn.Module:
    """Build from a ``conf/model/*.yaml`` mapping: ``name`` plus hyper-parameters.

    Hydra ``DictConfig`` objects are converted to plain containers first.

    Example:
        >>> build_model_from_config({"name": "shared_bottom", "bottom_hidden": [8]},
        ...                         d_in=4, tasks=["click"]).tasks
        ['click']
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    except ImportError:  # omegaconf ships with hydra-core; plain dicts need nothing
        pass
    cfg = dict(config)
    if "name" not in cfg:
        raise ValueError(
            f"model config needs a 'name' (one of {sorted(MODELS)}), got keys {sorted(cfg)}"
        )
    name = cfg.pop("name")
    return build_model(name, d_in=d_in, tasks=tasks, **cfg)
