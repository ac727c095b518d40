"""Shared test fixtures: locating the read-only data in ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MTL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_data(relative: str) -> Path:
    """Path of a file under ``../shared/data``.

    Skips the test when the file is missing on a developer machine, but fails
    loudly under CI (``CI=true``), where a silent skip would hide a broken set-up.
    """
    path = SHARED_DATA / relative
    if not path.exists():
        msg = f"shared data file {path} is missing (set MTL_SHARED_DATA or place ../shared beside the repo)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def census_path() -> Path:
    return shared_data("census-income-kdd/census-income.test.gz")


@pytest.fixture
def aliexpress_dir() -> Path:
    return shared_data("aliexpress-sample/train.csv").parent


@pytest.fixture
def shakespeare_path() -> Path:
    return shared_data("tinyshakespeare/input.txt")


def _count_log_calls(module: Any) -> list[str]:
    calls: list[str] = []
    log = module.log

    def counting(name: str, *args: Any, **kw: Any) -> None:
        calls.append(name)
        log(name, *args, **kw)

    module.log = counting
    return calls


@pytest.fixture
def count_log_calls() -> Any:
    """``count_log_calls(module) -> keys``: every later ``module.log`` call appends its key."""
    return _count_log_calls
