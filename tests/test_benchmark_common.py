"""benchmarks/common.py: what the JSON says about the code that produced it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
