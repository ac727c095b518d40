"""Helpers shared by the benchmark scripts: timing, memory, environment, tables, JSON.

Timing runs every variant of a comparison side by side: after warm-up, each
repeat round calls every variant once (in an order rotated from round to
round), and a variant's figure is the median over rounds. On a shared machine
the load changes during a run; interleaving makes the variants of one round
see the same load, so their *ratios* are more trustworthy than any single
absolute number.

Peak memory on CPU is the growth of the process's peak resident set size
(``VmHWM`` in ``/proc/self/status``) during one call, after returning freed
heap to the OS (``malloc_trim``) and resetting the peak (``/proc/self/clear_refs``).
On CUDA it is ``torch.cuda.max_memory_allocated`` above the memory allocated
before the call.

The allocator is the process's: the published CPU runs preload jemalloc for
every variant (``LD_PRELOAD``, benchmarks/README.md), and each JSON records
which allocator ``LD_PRELOAD`` named and whether it is mapped in the process
(:func:`preloaded_allocator`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    # a separate benchmark environment (torch-rechub's) need not have mtl installed
    sys.path.insert(0, str(REPO_ROOT))

OUT_DIR = BENCH_DIR / "out"


def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small smoke run (< ~2 minutes)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (default: all cores)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--no-plot", action="store_true", help="skip the PNG of every round's ratios (plots.py)"
    )
    return parser


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str, root: Path = REPO_ROOT) -> str | None:
    """Standard output of a read-only git command in ``root``, or None outside git."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit() -> str | None:
    """Commit of the working tree (read-only query), or None outside git."""
    out = _git("rev-parse", "--short", "HEAD")
    return None if out is None else out.strip()


def git_dirty(root: Path = REPO_ROOT) -> bool | None:
    """Whether tracked files differ from the commit (the figures then come from neither).

    None outside git. Untracked and ignored files (``benchmarks/out``) do not count.
    """
    out = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return None if out is None else bool(out.strip())


PRELOADABLE_ALLOCATORS = ("jemalloc", "tcmalloc")
"""Allocators a run may preload in place of glibc's malloc (benchmarks/README.md)."""


def preloaded_allocator(ld_preload: str | None = None, maps: str | None = None) -> dict[str, Any]:
    """Which allocator ``LD_PRELOAD`` names, and whether the process has it mapped.

    Args:
        ld_preload: the ``LD_PRELOAD`` value (default: this process's environment).
        maps: the text of ``/proc/self/maps`` (default: this process's, where readable).

    Returns:
        ``{"ld_preload": str | None, "allocator": "jemalloc" | "tcmalloc" | "glibc",
        "allocator_loaded": bool | None}``; ``allocator_loaded`` is None where the
        mappings cannot be read. A preload the dynamic linker could not find
        leaves ``allocator_loaded`` False.

    Example:
        >>> preloaded_allocator("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", maps="")
        {'ld_preload': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', 'allocator': 'jemalloc', 'allocator_loaded': False}
    """
    if ld_preload is None:
        ld_preload = os.environ.get("LD_PRELOAD") or None
    named = [a for a in PRELOADABLE_ALLOCATORS if a in (ld_preload or "")]
    allocator = named[0] if named else "glibc"
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = None
    loaded = None if maps is None or allocator == "glibc" else f"lib{allocator}" in maps
    return {"ld_preload": ld_preload, "allocator": allocator, "allocator_loaded": loaded}


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_start": os.getloadavg()[0],
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **preloaded_allocator(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    before_round: Callable[[str], None] | None = None,
    calls: Mapping[str, int] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each callable over ``repeats`` rotated rounds, after ``warmup`` calls.

    Args:
        fns: ``{name: step}``; each call is one timed unit (e.g. forward + backward).
        repeats: timed rounds; every round calls every variant ``calls[name]`` times.
        warmup: untimed calls of each variant first.
        device: synchronised before and after each variant's timed calls.
        before_round: called with a variant's name before each of its timed rounds
            (outside the timer), e.g. to reset gradients.
        calls: calls per round and variant (default 1), timed together and
            divided out: on a GPU a millisecond step timed alone between two
            syncs measures mostly the sync and the first launches.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            n = 1 if calls is None else max(1, int(calls.get(name, 1)))
            if before_round is not None:
                before_round(name)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / n)
    return times


def calls_for(
    fns: Mapping[str, Callable[[], object]], device: torch.device, target_s: float = 0.025
) -> dict[str, int]:
    """Calls per timed round so that each round lasts about ``target_s`` (1 on CPU).

    One synchronised call of each variant measures it; CPU steps here take
    tens of milliseconds or more and are timed one by one.
    """
    if device.type == "cpu":
        return {name: 1 for name in fns}
    out = {}
    for name, fn in fns.items():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out[name] = max(1, min(200, math.ceil(target_s / max(time.perf_counter() - t0, 1e-6))))
    return out


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            return None
    return _LIBC


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class MemoryResult:
    """Peak memory growth of one call and how it was measured."""

    peak_bytes: int | None
    method: str


def peak_memory(fn: Callable[[], object], device: torch.device) -> MemoryResult:
    """Peak memory growth during one call of ``fn`` (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return MemoryResult(torch.cuda.max_memory_allocated(device) - base, "cuda_max_allocated")
    if not Path("/proc/self/status").exists() or not _reset_peak_rss():
        fn()
        return MemoryResult(None, "unavailable")
    base = _proc_status_bytes("VmRSS")
    fn()
    return MemoryResult(_proc_status_bytes("VmHWM") - base, "rss_peak_delta")


def fmt_num(x: float | None, digits: int = 0) -> str:
    """Thousands-separated number, or a dash."""
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table with right-aligned numeric-looking columns."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_json(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``payload`` to ``benchmarks/out/<name>.json`` (or ``path``) and return the path."""
    out = path or OUT_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("env", {})["load_avg_1m_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out


def report_written(path: Path, args: argparse.Namespace) -> None:
    """Say where the JSON went and, unless ``--no-plot``, plot it next to it (``plots.py``)."""
    print(f"\nwrote {path}")
    if not getattr(args, "no_plot", False):
        from plots import plot_or_skip

        plot_or_skip(path)


def setup_process(args: argparse.Namespace) -> dict[str, Any]:
    """Threads for the whole run; returns what was set, for the JSON.

    Every variant runs in this one process, so each gets the same threads and
    the same allocator (the one the process was started with: says which when
    it is not jemalloc, which the published runs preload).
    """
    torch.set_num_threads(max(1, args.threads))
    alloc = preloaded_allocator()
    if alloc["allocator"] != "jemalloc" or not alloc["allocator_loaded"]:
        print(
            f"allocator: {alloc['allocator']}"
            f"{'' if alloc['allocator_loaded'] is not False else ' (named in LD_PRELOAD, not loaded)'}"
            "; the published runs preload jemalloc (benchmarks/README.md)",
            flush=True,
        )
    return {"torch_threads": torch.get_num_threads()}
