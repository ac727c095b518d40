"""The run folder (``output_dir``): one run per folder, one writer at a time, nothing lost.

A run writes ``config.yaml``, ``checkpoints/``, ``csv/metrics.csv``, ``tb/`` and
``metrics.json`` into its folder. Before it writes anything:

- :func:`check_run_dir` refuses a folder that already holds a run, unless the run
  continues it (``resume``) or the config says ``overwrite: true`` (then
  :func:`clear_run` removes the earlier run's files first, so no ``last-v1.ckpt``
  or stale ``metrics.json`` is left beside the new ones);
- :class:`RunLock` takes the folder's lock file, ``.mtl-run.lock``, holding the
  holder's pid and host: a second run into the same folder stops with the holder's
  name, and a lock left by a run that died is taken over with a warning;
- :func:`check_writable` proves the output and checkpoint folders take a file.

:class:`AppendingCSVLogger` keeps the rows a resumed run's folder already holds in
``csv/metrics.csv`` (Lightning's CSV logger deletes them).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

LOCK_NAME = ".mtl-run.lock"
"""The lock file in a run folder, held (``flock``) while a run writes the folder."""

RUN_FILES: tuple[str, ...] = ("config.yaml", "metrics.json", "test_scores.npz", "csv", "tb")
"""What a run of ``mtl train`` writes into its folder, besides its checkpoints."""

COMPARE_FILES: tuple[str, ...] = ("results.json", "report.md")
"""What ``mtl compare`` writes into its folder, besides a sub-folder per model."""


class RunDirError(ValueError):
    """An output folder a run may not use: it holds another run, is locked or not writable."""


def _is_resume(resume: Any) -> bool:
    return resume not in (None, "", "null")


def existing_run_files(
    out_dir: Path, ckpt_dir: Path | None = None, names: Iterable[str] = RUN_FILES
) -> list[Path]:
    """The files and folders of an earlier run in ``out_dir`` (and checkpoints in ``ckpt_dir``).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "metrics.json").write_text("{}")
        >>> [p.name for p in existing_run_files(folder)]
        ['metrics.json']
    """
    found = [out_dir / name for name in names if (out_dir / name).exists()]
    if ckpt_dir is not None and ckpt_dir.is_dir():
        found += sorted(ckpt_dir.glob("*.ckpt"))
    return found


def check_run_dir(
    out_dir: Path,
    *,
    ckpt_dir: Path | None = None,
    resume: Any = None,
    overwrite: bool = False,
    names: Iterable[str] = RUN_FILES,
) -> list[Path]:
    """Refuse an ``out_dir`` that holds a run, unless this run resumes it or overwrites it.

    Reads only: nothing in the folder changes.

    Args:
        out_dir: the run's ``output_dir``.
        ckpt_dir: the checkpoint callback's ``dirpath`` (usually ``out_dir/checkpoints``).
        resume: the config's ``resume`` (None, ``last`` or a checkpoint path); a path
            continues the folder's run only when it lies inside ``out_dir`` or ``ckpt_dir``.
        overwrite: the config's ``overwrite``: the earlier run's files may be replaced.
        names: the files and folders that mark a run in ``out_dir``.

    Returns:
        The earlier run's files (empty for a fresh folder), for :func:`clear_run`.

    Raises:
        RunDirError: the folder holds a run and neither ``resume`` nor ``overwrite`` says
            what to do with it, or both are given.
    """
    found = existing_run_files(out_dir, ckpt_dir, names)
    if overwrite and _is_resume(resume):
        raise RunDirError(
            f"resume={resume} and overwrite=true exclude each other: resume continues the run "
            f"in {out_dir}, overwrite replaces it; give one"
        )
    if not found or overwrite:
        return found
    if _is_resume(resume):
        if str(resume) == "last":
            return found
        path = Path(str(resume)).expanduser().resolve()
        homes = [out_dir.resolve(), *([ckpt_dir.resolve()] if ckpt_dir else [])]
        if any(path.is_relative_to(home) for home in homes):
            return found
        raise RunDirError(
            f"output_dir {out_dir} holds another run ({found[0].name}); resume={resume} would "
            "mix it with that run's files: resume into a new output_dir, or resume=last to "
            "continue the run in this folder"
        )
    raise RunDirError(
        f"output_dir {out_dir} already holds a run ({', '.join(p.name for p in found[:4])}); "
        "continue it with resume=last, replace it with overwrite=true, or choose another output_dir"
    )


def clear_run(files: Iterable[Path]) -> None:
    """Delete an earlier run's files (``overwrite: true``), folders included."""
    for path in files:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        log.warning("overwrite: removed %s of the earlier run", path)


def check_writable(folder: Path, what: str = "output_dir") -> None:
    """Create ``folder`` if needed and prove it takes a file (written, then removed).

    Raises:
        RunDirError: the folder cannot be created or written, naming it and the reason.

    Example:
        >>> import tempfile
        >>> check_writable(Path(tempfile.mkdtemp()) / "checkpoints", "checkpoint folder")
    """
    probe = folder / f".mtl-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RunDirError(
            f"{what} {folder} is not writable ({reason}); a run needs it to save its results"
        ) from None


def config_checkpoint_dir(cfg: DictConfig) -> Path | None:
    """The ``dirpath`` of the config's ``ModelCheckpoint`` callback, read before it is built.

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"callbacks": {"ckpt": {
        ...     "_target_": "pytorch_lightning.callbacks.ModelCheckpoint", "dirpath": "runs/x/ckpt"}}})
        >>> config_checkpoint_dir(cfg)
        PosixPath('runs/x/ckpt')
    """
    for node in (cfg.get("callbacks") or {}).values():
        if node is None or not str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            continue
        if node.get("dirpath"):
            return Path(str(node.dirpath)).expanduser()
    return None


def prepare_run_dir(
    out_dir: Path, ckpt_dir: Path, *, clear: bool = False, earlier: Iterable[Path] = ()
) -> None:
    """Make the run folder ready to write, once every check that reads has passed.

    Args:
        out_dir: the run's ``output_dir``.
        ckpt_dir: the checkpoint folder.
        clear: remove ``earlier`` first (``overwrite: true``).
        earlier: the earlier run's files, as :func:`check_run_dir` found them.

    Raises:
        RunDirError: ``out_dir`` or ``ckpt_dir`` is not writable (checked before clearing).
    """
    check_writable(out_dir, "output_dir")
    check_writable(ckpt_dir, "checkpoint folder")
    if clear:
        clear_run(earlier)
        ckpt_dir.mkdir(parents=True, exist_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """The lock of a run folder: at most one run writes ``folder`` at a time.

    The lock is an exclusive ``flock`` on ``folder/.mtl-run.lock``; the file holds the
    holder's pid, host and start time for the message a second run gets. The kernel
    drops the ``flock`` when its process dies, so a lock file left by a killed run
    is stale: the next run takes it over and logs a warning naming the dead pid.
    The file is removed on release; a folder the lock created, left empty, is removed too.

    Args:
        folder: the run folder (created if missing).

    Raises:
        RunDirError: on entering, when another live process holds the lock.

    Example:
        >>> import tempfile
        >>> with RunLock(Path(tempfile.mkdtemp()) / "run") as lock:
        ...     lock.path.name
        '.mtl-run.lock'
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> RunLock:
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"output_dir {self.folder} cannot be created ({exc.strerror or exc})"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._remove_created_folder()
                raise RunDirError(
                    f"output_dir {self.folder} is not writable: cannot create its lock file "
                    f"{self.path.name} ({exc.strerror or exc})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder()
                raise RunDirError(
                    f"output_dir {self.folder} is in use by another run (pid {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')}, lock file {self.path}); wait for it to end or "
                    "choose another output_dir"
                ) from None
            # The previous holder may have removed the file between our open and flock:
            # then we hold a lock on a deleted file, and must lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = self._holder()
        if stale.get("pid") is not None:
            # The file names a holder, yet the flock was free: that process died (the
            # kernel drops a dead process's flock) without removing the file.
            log.warning(
                "output_dir %s: taking over the stale lock of pid %s on %s (%s), which "
                "ended without releasing it",
                self.folder,
                stale.get("pid"),
                stale.get("host"),
                "no longer running"
                if stale.get("host") == socket.gethostname() and not _pid_alive(int(stale["pid"]))
                else "no longer holding it",
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            # rmdir removes only an empty folder: a failed start leaves no folder behind.
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is None:
            return
        # Unlink before unlocking: a waiting run then finds the file gone and makes its own.
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        self._remove_created_folder()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here. The run folder guard (check_run_dir) lets a
        # run into a folder with rows only when it resumes that run, so the rows are this
        # run's own history: keep them, and their header, so new rows append below them.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    """:class:`~pytorch_lightning.loggers.CSVLogger` that appends to an existing ``metrics.csv``.

    A resumed run keeps the rows logged before the interruption; columns new to the
    resumed run widen the file (earlier rows get empty cells). Rows logged after the
    last checkpoint and before the interruption appear again when the resumed run
    replays those steps (same ``step``).

    Example:
        >>> logger = AppendingCSVLogger(save_dir="runs/x", name="csv", version="")  # doctest: +SKIP
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
