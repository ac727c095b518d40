"""Run folders that never lose or mix work: reruns, resumes, locks, unwritable folders, save_top_k=0.

Every case trains a tiny MMoE on synthetic CTR data for an epoch or two (seconds each).
"""

from __future__ import annotations

import builtins
import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl.cli import main
from mtl.training.checkpoints import CheckpointError
from mtl.training.config import compose_config
from mtl.training.run_dir import LOCK_NAME, AppendingCSVLogger, RunDirError
from mtl.training.train import train

TINY = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=50",
    "data.source_kwargs.n_items=30",
    "data.batch_size=256",
    "model.num_experts=2",
    "model.expert_hidden=[8]",
    "model.tower_hidden=[4]",
    "callbacks.early_stopping=null",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


def run(out: Path, *extra: str, epochs: int = 1) -> dict[str, Any]:
    return train(
        compose_config(
            "train", [*TINY, *extra, f"trainer.max_epochs={epochs}", f"output_dir={out}"]
        )
    )


def cli(out: Path, *extra: str, epochs: int = 1) -> int:
    return main(["train", *TINY, *extra, f"trainer.max_epochs={epochs}", f"output_dir={out}"])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content's hash; folders too."""
    return {
        str(p.relative_to(folder)): (
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(folder.rglob("*"))
    }


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(out)
    return out


@pytest.fixture
def copied_run(one_epoch_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    return out


# ------------------------------------------------------------- reruns and overwrite


def test_rerun_into_a_folder_holding_a_run_is_refused_and_changes_nothing(
    copied_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(copied_run)
    assert cli(copied_run, epochs=2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "resume=last" in err
    assert "overwrite=true" in err and str(copied_run) in err
    assert snapshot(copied_run) == before


def test_overwrite_replaces_the_earlier_run_without_mixing_files(copied_run: Path) -> None:
    result = run(copied_run, "overwrite=true", "seed=5", epochs=1)
    ckpts = sorted(p.name for p in (copied_run / "checkpoints").iterdir())
    assert ckpts == ["best-epoch000.ckpt", "last.ckpt"]  # no last-v1.ckpt beside the old ones
    assert result["last_ckpt"] == str(copied_run / "checkpoints" / "last.ckpt")
    assert json.loads((copied_run / "metrics.json").read_text())["seed"] == 5 == result["seed"]
    assert "seed: 5" in (copied_run / "config.yaml").read_text()
    assert len({r["epoch"] for r in csv_rows(copied_run) if r.get("val/loss")}) == 1


def test_resume_and_overwrite_together_are_refused(copied_run: Path) -> None:
    with pytest.raises(RunDirError, match="exclude each other"):
        run(copied_run, "resume=last", "overwrite=true", epochs=2)


def test_resume_from_a_checkpoint_of_another_folder_into_a_run_folder_is_refused(
    copied_run: Path, tmp_path: Path
) -> None:
    other = tmp_path / "elsewhere.ckpt"
    shutil.copy(copied_run / "checkpoints" / "last.ckpt", other)
    before = snapshot(copied_run)
    with pytest.raises(RunDirError, match="would mix it with that run"):
        run(copied_run, f"resume={other}", epochs=2)
    assert snapshot(copied_run) == before


# ------------------------------------------------------------------------- resume


def test_resume_last_continues_and_keeps_the_metric_rows_logged_before(copied_run: Path) -> None:
    before = csv_rows(copied_run)
    assert {r["epoch"] for r in before if r.get("val/loss")} == {"0"}
    result = run(copied_run, "resume=last", epochs=2)
    assert result["epochs"] == 2
    after = csv_rows(copied_run)
    # every row of the first run is still there, in order, followed by the resumed run's
    assert [r["val/loss"] for r in after[: len(before)]] == [r["val/loss"] for r in before]
    assert {r["epoch"] for r in after if r.get("val/loss")} == {"0", "1"}


def _truncated(ckpt: Path, tmp_path: Path) -> None:
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])


def _empty(ckpt: Path, tmp_path: Path) -> None:
    ckpt.write_bytes(b"")


def _raw_state_dict(ckpt: Path, tmp_path: Path) -> None:
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], ckpt)


def _pickled_object(ckpt: Path, tmp_path: Path) -> None:
    # weights_only=True refuses to unpickle anything but tensors and plain values
    torch.save({"state_dict": {}, "callable": subprocess.Popen}, ckpt)


def _other_model(ckpt: Path, tmp_path: Path) -> None:
    shutil.copy(run(tmp_path / "omoe", "model=omoe")["last_ckpt"], ckpt)


def _other_data(ckpt: Path, tmp_path: Path) -> None:
    shutil.copy(run(tmp_path / "items", "data.source_kwargs.n_items=40")["last_ckpt"], ckpt)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_truncated, "cannot be read with weights_only=True: truncated"),
        (_empty, "is empty"),
        (_raw_state_dict, "is not a checkpoint saved by mtl train"),
        (_pickled_object, "cannot be read"),
        (_other_model, "another model or data.*_target_"),
        (_other_data, "another model or data.*embedding.spec"),
    ],
    ids=["truncated", "empty", "raw-state-dict", "pickled-object", "other-model", "other-data"],
)
def test_bad_resume_checkpoint_is_one_line_naming_it_and_the_folder_is_unchanged(
    copied_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spoil: Any,
    message: str,
) -> None:
    ckpt = copied_run / "checkpoints" / "last.ckpt"
    spoil(ckpt, tmp_path)
    before = snapshot(copied_run)
    capsys.readouterr()
    assert cli(copied_run, "resume=last", epochs=2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resume checkpoint") and err.count("\n") == 1, err
    assert str(ckpt) in err
    assert __import__("re").search(message, err), err
    assert snapshot(copied_run) == before  # config.yaml, csv/metrics.csv, lock: all as before


# -------------------------------------------------------------------------- locks


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """Another process holding the lock of ``tmp_path/run`` until the test ends."""
    out = tmp_path / "run"
    code = (
        "import sys; from pathlib import Path; from mtl.training.run_dir import RunLock\n"
        f"with RunLock(Path({str(out)!r})):\n"
        "    print('locked', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield out, proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(
    lock_holder: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    out, pid = lock_holder
    before = snapshot(out)
    assert cli(out) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and f"pid {pid}" in err and LOCK_NAME in err
    assert snapshot(out) == before


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    with caplog.at_level(logging.WARNING, logger="mtl.training.run_dir"):
        result = run(out)
    assert result["epochs"] == 1
    assert any(f"stale lock of pid {pid}" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_NAME).exists()  # released at the end


# ------------------------------------------------------------ unwritable folders


def _refuse_writes(
    monkeypatch: pytest.MonkeyPatch, folder: Path, suffixes: tuple[str, ...] = ()
) -> list[str]:
    """Make ``open`` for writing under ``folder`` raise PermissionError, as on a read-only folder.

    Root writes through ``chmod``; this fails the same way for every user. Returns the
    refused paths. ``suffixes``: refuse only names ending so (empty: every name).
    """
    real_open = builtins.open
    refused: list[str] = []

    def guarded(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        name = os.fspath(file) if isinstance(file, str | os.PathLike) else ""
        writing = any(c in mode for c in "wxa+")
        if writing and name.startswith(str(folder)) and (not suffixes or name.endswith(suffixes)):
            refused.append(name)
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    return refused


def test_unwritable_checkpoint_folder_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    _refuse_writes(monkeypatch, out / "checkpoints")
    with pytest.raises(RunDirError, match=r"checkpoint folder .*checkpoints is not writable"):
        run(out, epochs=2)
    assert not (out / "csv").exists() and not (out / "config.yaml").exists()  # nothing trained


def test_read_only_checkpoint_folder_fails_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt_dir.chmod(0o555)
    try:
        probe = ckpt_dir / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip(
                "running as root: chmod does not stop root's writes "
                "(test_unwritable_checkpoint_folder_fails_before_training covers this case)"
            )
        with pytest.raises(RunDirError, match="is not writable"):
            run(out, epochs=2)
        assert not (out / "csv").exists()
    finally:
        ckpt_dir.chmod(0o755)


def test_failed_checkpoint_save_stops_the_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    refused = _refuse_writes(monkeypatch, out / "checkpoints", suffixes=(".ckpt", ".tmp"))
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*best-epoch000\.ckpt"):
        run(out, epochs=3)
    assert len(refused) == 1  # the first save failed, and the run stopped there


# ---------------------------------------------------------------- save_top_k=0


def test_save_top_k_0_summary_says_the_final_weights_were_tested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli(out, "callbacks.model_checkpoint.save_top_k=0") == 0
    text = capsys.readouterr().out
    assert "final weights" in text and "best checkpoint by" not in text
    assert json.loads((out / "metrics.json").read_text())["tested"] == "final weights"


# -------------------------------------------------------------------- compare


def test_compare_refuses_a_folder_holding_a_comparison_unless_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", *TINY, "models=[mmoe]", "seeds=1", "trainer.max_epochs=1"]
    out = tmp_path / "cmp"
    assert main([*args, f"output_dir={out}"]) == 0
    assert (out / "mmoe" / "seed0" / "metrics.json").is_file() and (out / "results.json").is_file()
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, f"output_dir={out}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main([*args, f"output_dir={out}", "overwrite=true"]) == 0
    assert sorted(p.name for p in (out / "mmoe" / "seed0" / "checkpoints").iterdir()) == [
        "best-epoch000.ckpt",
        "last.ckpt",
    ]


# ------------------------------------------------------------------ CSV logger


def test_csv_logger_appends_to_existing_rows_and_widens_the_header(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("a,epoch,step\n1.0,0,0\n")
    logger = AppendingCSVLogger(save_dir=tmp_path, name="csv", version="")
    logger.log_metrics({"a": 2.0, "b": 3.0, "epoch": 1}, step=5)
    logger.save()
    rows = csv_rows(tmp_path)
    assert [(r["a"], r["b"], r["step"]) for r in rows] == [("1.0", "", "0"), ("2.0", "3.0", "5")]
