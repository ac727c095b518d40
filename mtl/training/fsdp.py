"""Fully sharded data parallel training of the LM: torch's FSDP2 (``fully_shard``) through
Lightning's :class:`~pytorch_lightning.strategies.ModelParallelStrategy`.

Why FSDP2 and not Lightning's ``strategy="fsdp"``: the latter wraps the model in torch's
first FSDP (``FullyShardedDataParallel``), which Lightning 2.6 refuses without a GPU
("requires a GPU accelerator") and torch refuses too ("FSDP needs a non-CPU accelerator
device"). ``fully_shard`` on a ``DeviceMesh`` runs on CPU with gloo as on GPUs with nccl
(Lightning picks the backend from the device), so the same ``trainer=fsdp`` is tested
here with two CPU processes and used on GPUs unchanged.

What is sharded (the FSDP2 counterpart of a transformer auto-wrap policy): every
transformer block is one ``fully_shard`` unit, gathered for its forward and backward
and freed after; the embedding, the final norm and the (tied) output projection form
the root unit. Every parameter, gradient and optimizer state lives on one rank in
``1/W``; gradients are reduce-scattered, which gives every rank the mean over the
global batch, as DDP does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

__all__ = ["FSDPStrategy", "optimizer_state_by_name", "shard_blocks"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(
            f"trainer.strategy.{key} must be one of {sorted(_DTYPES)} or null, got {name!r}"
        )
    return _DTYPES[name]


def shard_blocks(
    net: nn.Module,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> bool:
    """``fully_shard`` each block of ``net.layers``, then ``net`` itself (the root unit).

    Args:
        net: a model with an ``nn.ModuleList`` ``layers`` of transformer blocks.
        mesh: the 1-D data-parallel mesh the parameters are sharded over.
        param_dtype: dtype parameters are gathered in for compute (None: as stored,
            float32); ``torch.bfloat16`` is FSDP2's mixed precision.
        reduce_dtype: dtype of the gradient reduce-scatter (None: ``param_dtype``).
        reshard_after_forward: free gathered block weights after the forward
            (gathered again for the backward); False keeps them, trading memory for
            one all-gather less per block.

    Returns:
        False when ``net`` was sharded already (Lightning calls ``configure_model``
        again for every fit, validate and test), else True.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(net, FSDPModule):
        return False
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in net.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return True


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with pure data-parallel sharding of the LM.

    The LightningModule's ``configure_model`` calls :meth:`shard` with its network; the
    strategy supplies the mesh and the mixed-precision and resharding settings from
    the config. Checkpoints are full (one file, written by rank 0) unless
    ``save_distributed_checkpoint`` is set, so a run resumes in one process or in
    another number of processes.

    Args:
        param_dtype: ``"bfloat16"`` (GPUs: FSDP2 mixed precision, parameters gathered
            and computed in bf16), ``"float32"`` or None (as stored).
        reduce_dtype: dtype of the gradient reduction; None: ``param_dtype``.
        reshard_after_forward: see :func:`shard_blocks`.
        save_distributed_checkpoint: True: a folder of per-rank shards (large models);
            False: one full file.
        **kwargs: other ``ModelParallelStrategy`` options (``process_group_backend``,
            ``timeout``).

    Example:
        >>> FSDPStrategy(param_dtype="bfloat16").param_dtype
        torch.bfloat16
    """

    def __init__(
        self,
        *,
        param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",  # every process, set in setup_environment
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,  # type: ignore[arg-type]
        )
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's "auto" is one data-parallel group per node (tensor parallelism
        # within a node); here every process is a data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint into the sharded model and optimizer.

        A folder of shards goes to Lightning. A one-file checkpoint (from this strategy,
        DDP or one process) is loaded here: Lightning would read its optimizer's
        parameter ids in the module's parameter order, but torch numbers them in the
        optimizer's group order (matrices, then vectors with no weight decay), so the
        moments would land on other parameters. Here each id is named by position
        within its group, which is how torch's own ``Optimizer.load_state_dict`` reads it.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        assert self.model is not None and self.lightning_module is not None
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        for state, optimizer in zip(checkpoint["optimizer_states"], self.optimizers, strict=True):
            named = optimizer_state_by_name(state, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint

    def shard(self, net: nn.Module) -> bool:
        """Shard ``net``'s blocks over this strategy's data-parallel mesh (:func:`shard_blocks`)."""
        return shard_blocks(
            net,
            self.device_mesh["data_parallel"],
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            reshard_after_forward=self.reshard_after_forward,
        )


def optimizer_state_by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> dict[str, Any]:
    """``state`` (an ``optimizer.state_dict()``) keyed by parameter names of ``module``.

    The saved and the live param groups are paired by position, and within a group the
    parameters too, as torch's ``Optimizer.load_state_dict`` pairs them.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> w0, b0, w1, b1 = net.parameters()
        >>> opt = torch.optim.SGD([{"params": [w0, w1]}, {"params": [b0, b1]}], lr=0.1)
        >>> optimizer_state_by_name(opt.state_dict(), opt, net)["param_groups"][1]["params"]
        ['0.bias', '1.bias']
    """
    if not all(isinstance(k, int) for k in state["state"]):
        return state
    names = {p: n for n, p in module.named_parameters()}
    by_id = {
        i: names[p]
        for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True)
        for i, p in zip(saved["params"], live["params"], strict=True)
    }
    return {
        "state": {by_id[i]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [by_id[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
