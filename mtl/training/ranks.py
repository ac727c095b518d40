"""Which process of a multi-process run this is, before Lightning's trainer exists.

``trainer=ddp`` runs start their processes in one of three ways: Lightning's launcher
re-runs the ``mtl train`` command with ``LOCAL_RANK`` (and ``NODE_RANK``) set, ``torchrun``
sets ``RANK``, and SLURM sets ``SLURM_PROCID``. Every process runs :func:`mtl.training.train.train`
from the top, but only global rank 0 may lock, clear and write the run folder; the others
would find it locked or already holding the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

RANK_VARIABLES: tuple[str, ...] = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
"""Environment variables that name a process's rank (global, SLURM task, local, node)."""


def is_launch_rank_zero(environ: Mapping[str, str] | None = None) -> bool:
    """True unless the environment names this process as one other than global rank 0.

    Global rank 0 is rank 0 on every level (node, local, SLURM task, global), so one
    non-zero value is enough to tell a worker; a single-process run sets none of them.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Example:
        >>> is_launch_rank_zero({}), is_launch_rank_zero({"LOCAL_RANK": "1"})
        (True, False)
        >>> is_launch_rank_zero({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"})
        True
    """
    env = os.environ if environ is None else environ
    return all(int(env.get(name) or 0) == 0 for name in RANK_VARIABLES)
