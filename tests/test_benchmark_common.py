"""benchmarks/common.py: what the JSON says about the code that produced it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import common
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _git(repo: Path, *args: str) -> None:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *ident, *args], cwd=repo, check=True, capture_output=True)


def test_git_dirty_sees_changed_tracked_files_only(tmp_path: Path) -> None:
    assert common.git_dirty(tmp_path) is None  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-qm", "a")
    assert common.git_dirty(tmp_path) is False
    (tmp_path / "out.json").write_text("{}")  # untracked, like benchmarks/out
    assert common.git_dirty(tmp_path) is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_dirty(tmp_path) is True


def test_preloaded_allocator_names_the_preload_and_checks_it_is_mapped() -> None:
    jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    mapped = f"7f00-7f10 r-xp 00000000 08:01 42 {jemalloc}\n"
    assert common.preloaded_allocator(jemalloc, maps=mapped) == {
        "ld_preload": jemalloc,
        "allocator": "jemalloc",
        "allocator_loaded": True,
    }
    # named but not found by the dynamic linker: not mapped
    assert common.preloaded_allocator(jemalloc, maps="")["allocator_loaded"] is False
    tcmalloc = common.preloaded_allocator("/usr/lib/libtcmalloc_minimal.so.4", maps="")
    assert tcmalloc["allocator"] == "tcmalloc"
    glibc = common.preloaded_allocator("/usr/lib/libfoo.so", maps=mapped)
    assert glibc["allocator"] == "glibc" and glibc["allocator_loaded"] is None


def test_environment_records_this_process_allocator() -> None:
    env = common.environment(torch.device("cpu"))
    assert env["allocator"] in ("jemalloc", "tcmalloc", "glibc")
    assert {"ld_preload", "allocator_loaded", "omp_wait_policy"} <= set(env)
