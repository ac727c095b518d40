"""Turning Hydra/OmegaConf config nodes into the plain containers constructors expect."""

from __future__ import annotations

import sys
from typing import Any


def to_plain(value: Any) -> Any:
    """``DictConfig``/``ListConfig`` -> dict/list with interpolations resolved; anything else unchanged.

    Hydra hands config nodes; hparams, registries and ``**kwargs`` want plain containers.
    OmegaConf is not imported here: a config node can only exist once it is, so
    the model packages that call this (:mod:`mtl.models.lm`) need nothing but
    torch (on a GPU machine without Hydra, say).

    Example:
        >>> from omegaconf import OmegaConf
        >>> to_plain(OmegaConf.create({"a": 1, "b": "${a}"}))
        {'a': 1, 'b': 1}
        >>> to_plain([1, 2])
        [1, 2]
    """
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, omegaconf.DictConfig | omegaconf.ListConfig):
        return omegaconf.OmegaConf.to_container(value, resolve=True)
    return value
