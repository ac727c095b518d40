"""Which process of a multi-process run this is, and sums over the processes.

Before Lightning's trainer exists (:func:`is_launch_rank_zero`): ``trainer=ddp`` runs start their processes in one of three ways: Lightning's launcher
re-runs the ``mtl train`` command with ``LOCAL_RANK`` (and ``NODE_RANK``) set, ``torchrun``
sets ``RANK``, and SLURM sets ``SLURM_PROCID``. Every process runs :func:`mtl.training.train.train`
from the top, but only global rank 0 may lock, clear and write the run folder; the others
would find it locked or already holding the run.

Inside a ``LightningModule`` (:func:`trainer_world_size`, :func:`rank_sum`): how many
processes its trainer runs, and a sum of a tensor over them, for the modules'
per-step and per-epoch statistics; :func:`is_multi_process`: whether the default
process group spans several processes, for the modules' ``configure_model``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import Tensor

    from mtl.moe.routing_sums import SumOverRanks

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


def trainer_world_size(module: pl.LightningModule) -> int:
    """The number of processes ``module``'s trainer runs; 1 for a module without a trainer.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer_world_size(pl.LightningModule())
        1
    """
    try:
        return int(module.trainer.world_size)
    except RuntimeError:  # not attached to a trainer
        return 1


def is_multi_process() -> bool:
    """True when ``torch.distributed``'s default process group runs more than one process.

    For hooks such as ``configure_model`` that act on the process group itself
    (:func:`trainer_world_size` reads the trainer instead); False without a
    process group, or with a single-process one.

    Example:
        >>> is_multi_process()  # no process group here
        False
    """
    # imported here so that the module itself still loads without torch
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_sum(module: pl.LightningModule) -> SumOverRanks:
    """A function summing a tensor over the processes of ``module``'s trainer (collective).

    The tensor it is given is left as it is. Every process must call the function
    with a tensor of the same shape.

    Example:
        >>> total = rank_sum(module)(torch.ones(3))  # doctest: +SKIP
    """

    def reduce_sum(x: Tensor) -> Tensor:
        # Lightning's strategies reduce in place: hand them a tensor nobody else holds.
        return module.trainer.strategy.reduce(x.clone(), reduce_op="sum")

    return reduce_sum
