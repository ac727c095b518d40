"""reuse_freed_memory: applies on glibc, rejects bad settings, and leaves tensors correct."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from mtl.training.cpu_memory import MMAP_THRESHOLD_MAX, reuse_freed_memory


def test_applies_on_glibc_linux() -> None:
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_memory() is on_glibc
    # memory handed out after the change is ordinary memory
    a = torch.ones(1024, 528)
    del a
    b = torch.zeros(1024, 528)
    assert b.abs().sum().item() == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        {"mmap_threshold": 0},
        {"mmap_threshold": MMAP_THRESHOLD_MAX + 1},
        {"trim_threshold": -1},
        {"top_pad": -1},
    ],
)
def test_bad_settings_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        reuse_freed_memory(**kw)
