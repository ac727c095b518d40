"""Keep freed CPU memory for reuse, so training steps stop page-faulting fresh buffers.

glibc's malloc serves every allocation above its mmap threshold (128 KiB,
raised dynamically up to the size of the largest freed block) with a fresh
``mmap`` and returns freed memory at the top of the heap to the OS once it
exceeds the trim threshold. A training step allocates and frees the same
megabyte-sized activations and gradients every step, so each step faults the
same amount of memory in page by page; on virtual machines a page fault costs
microseconds, and a 2 MiB buffer costs more to fault in than to compute.
Measured on a 2-core KVM guest: four overlapping ``torch.zeros(1024, 528)``
took 2.3 ms with glibc's defaults and 0.08 ms after :func:`reuse_freed_memory`.

This is a process-wide allocator setting (like ``LD_PRELOAD``-ing jemalloc or
tcmalloc, which PyTorch's CPU performance guide recommends), so the training
entry points apply it, behind a config flag, rather than on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's ceiling for ``M_MMAP_THRESHOLD`` on 64-bit systems."""


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  # absent outside glibc (musl...)
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory(
    *,
    mmap_threshold: int = MMAP_THRESHOLD_MAX,
    trim_threshold: int = 1 << 30,
    top_pad: int = 64 << 20,
) -> bool:
    """Make glibc serve allocations up to ``mmap_threshold`` from the heap and keep freed memory.

    Args:
        mmap_threshold: allocations at least this large still get their own
            ``mmap`` (at most 32 MiB, glibc's ceiling).
        trim_threshold: free memory at the top of the heap is returned to the
            OS only beyond this many bytes.
        top_pad: extra bytes requested whenever the heap grows.

    Returns:
        True if the settings were applied, False where the C library is not
        glibc (macOS, Windows, musl), in which case nothing changes.

    Example:
        >>> isinstance(reuse_freed_memory(), bool)
        True
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(
            f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}], got {mmap_threshold}"
        )
    if trim_threshold < 0 or top_pad < 0:
        raise ValueError("trim_threshold and top_pad must be >= 0")
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    ok &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    ok &= libc.mallopt(M_TOP_PAD, ctypes.c_int(min(top_pad, 2**31 - 1)))
    return bool(ok)
