"""Turning Hydra/OmegaConf config nodes into the plain containers constructors expect."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(value: Any) -> Any:
    """``DictConfig``/``ListConfig`` -> dict/list with interpolations resolved; anything else unchanged.

    Hydra hands config nodes; hparams, registries and ``**kwargs`` want plain containers.

    Example:
        >>> to_plain(OmegaConf.create({"a": 1, "b": "${a}"}))
        {'a': 1, 'b': 1}
        >>> to_plain([1, 2])
        [1, 2]
    """
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
