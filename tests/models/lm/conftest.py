"""Fixtures of the language-model tests: building presets from ``conf/model/lm_*.yaml``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from mtl.models.lm import TransformerLM
from mtl.training.build import build_lm
from mtl.training.gate_config import model_config

CONF_MODEL = Path(__file__).resolve().parents[3] / "conf" / "model"
LM_PRESETS = sorted(p.stem for p in CONF_MODEL.glob("lm_*.yaml"))


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset's model config (plain dict) with dotted-key overrides applied."""
    cfg = OmegaConf.create(model_config(name))  # with the gate its defaults list picks
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


@pytest.fixture
def build_preset() -> Callable[..., TransformerLM]:
    """``build_preset("lm_mixtral", vocab_size=50, max_seq_len=32, **{"moe.k": 1})``."""

    def build(
        name: str, *, vocab_size: int = 50, max_seq_len: int = 32, **overrides: Any
    ) -> TransformerLM:
        cfg = preset_config(name, max_seq_len=max_seq_len, **overrides)
        return build_lm(cfg, vocab_size=vocab_size)

    return build


@pytest.fixture(autouse=True)
def _one_thread_seeded() -> Iterator[None]:
    # Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine
    # oversubscription makes them an order of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
