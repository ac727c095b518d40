"""Expert parallelism in :class:`~mtl.training.lm_module.LMModule`: set-up, checkpoints, guards.

Functions that the module's Lightning hooks call when ``net.expert_parallel > 1``:

* :func:`configure_expert_parallel` (``configure_model``): builds the
  :class:`~mtl.moe.expert_parallel_plan.ExpertParallelPlan`, shards the routed
  experts and tells DDP to leave the shards alone (they differ per rank).
* :func:`gather_expert_checkpoint` (``on_save_checkpoint``): every rank gathers
  the whole expert banks, so the file holds the unsharded model under the
  unsharded names, AdamW's per-expert moments included; such a file loads into a
  single-process model or one with another ``expert_parallel``.
* :func:`slice_expert_checkpoint` (``on_load_checkpoint``): the reverse, keeping
  this rank's experts of the whole banks, weights and moments.
* :func:`check_equal_batch_counts` (``on_validation_start``): under expert
  parallelism every forward is a collective, so a rank with one batch more
  than the others would wait for them forever; refuse that instead.

Gradient reduction and clipping over the shards are the plan's own
(:meth:`~mtl.moe.expert_parallel_plan.ExpertParallelPlan.reduce_expert_grads_`,
:meth:`~mtl.moe.expert_parallel_plan.ExpertParallelPlan.clip_grad_norm_`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtl.moe.expert_parallel import (
    ExpertShard,
    gather_expert_rows,
    gather_experts,
    map_expert_rows,
)
from mtl.moe.expert_parallel_plan import ExpertParallelPlan, set_ddp_ignore

log = logging.getLogger(__name__)

__all__ = [
    "check_equal_batch_counts",
    "configure_expert_parallel",
    "expert_shards",
    "gather_expert_checkpoint",
    "slice_expert_checkpoint",
]


def expert_shards(net: nn.Module, prefix: str = "net.") -> dict[str, ExpertShard]:
    """The :class:`~mtl.moe.expert_parallel.ExpertShard` s of ``net`` by state-dict prefix.

    Args:
        net: the model, after :func:`configure_expert_parallel`.
        prefix: ``net``'s own prefix in the state dict (``"net."`` inside ``LMModule``).

    Returns:
        ``{prefix + name + ".": shard}``, in module order.
    """
    return {
        f"{prefix}{name}.": module
        for name, module in net.named_modules()
        if isinstance(module, ExpertShard)
    }


def configure_expert_parallel(
    module: nn.Module, net: nn.Module, *, expert_parallel: int, fsdp: bool
) -> ExpertParallelPlan:
    """Shard ``net``'s routed experts over groups of ``expert_parallel`` ranks.

    Collective (every rank builds the plan). The shards' names (under ``module``,
    which holds ``net`` as ``module.net``) go into DDP's ignore list: their
    gradients are reduced by the plan, not averaged by DDP.

    Args:
        module: the module DDP wraps (the ``LightningModule``).
        net: ``module.net``, the language model.
        expert_parallel: ranks per expert-parallel group.
        fsdp: whether the run shards blocks with FSDP, which this does not combine with.

    Returns:
        the plan (its ``mesh`` and gradient methods).
    """
    if fsdp:
        raise ValueError(
            f"model.moe.expert_parallel={expert_parallel} runs with trainer=ddp, not trainer=fsdp"
        )
    plan = ExpertParallelPlan(expert_parallel=expert_parallel)
    set_ddp_ignore(module, [f"net.{name}" for name in plan.apply(net)])
    shards = list(expert_shards(net).values())
    if shards:
        first, L = shards[0].first_expert, shards[0].local.num_experts
        dp, ep = plan.mesh.shape
        log.info(
            f"expert parallel: rank {plan.mesh.get_rank()} holds experts [{first}, {first + L}) "
            f"of {shards[0].num_experts} in {len(shards)} MoE layers (mesh dp x ep = {dp} x {ep})"
        )
    return plan


def gather_expert_checkpoint(
    checkpoint: dict[str, Any],
    net: nn.Module,
    plan: ExpertParallelPlan,
    params: Sequence[nn.Parameter],
) -> None:
    """Replace this rank's expert shards in a Lightning ``checkpoint`` by the whole banks.

    Collective: every rank gathers (only rank 0 writes the file).

    Args:
        checkpoint: the dict Lightning saves; ``state_dict`` and ``optimizer_states`` change.
        net: the sharded language model (``module.net``).
        plan: its :class:`~mtl.moe.expert_parallel_plan.ExpertParallelPlan`.
        params: the optimiser's parameters in its order (torch numbers the
            states in this order across groups).
    """
    state = checkpoint["state_dict"]
    for prefix, shard in expert_shards(net).items():
        full = gather_experts(shard, plan.mesh["ep"])
        for key in [k for k in state if k.startswith(prefix + "local.")]:
            del state[key]
        state.update({prefix + k: v for k, v in full.state_dict().items()})
    _reshard_optimizer_states(
        checkpoint.get("optimizer_states", []), net, plan, params, gather=True
    )


def slice_expert_checkpoint(
    checkpoint: dict[str, Any],
    net: nn.Module,
    plan: ExpertParallelPlan,
    params: Sequence[nn.Parameter],
) -> None:
    """Keep this rank's experts of the whole banks in a loaded ``checkpoint`` (weights, moments).

    Args: as :func:`gather_expert_checkpoint`; ``params`` in the order the
    optimiser will be built with (it does not exist yet when Lightning loads).
    """
    state = checkpoint["state_dict"]
    for prefix, shard in expert_shards(net).items():
        whole = {name: state.pop(prefix + name) for name in shard.local.state_dict()}
        own = map_expert_rows(whole, shard.num_experts, _own_rows(shard))
        state.update({f"{prefix}local.{name}": t for name, t in own.items()})
    _reshard_optimizer_states(
        checkpoint.get("optimizer_states", []), net, plan, params, gather=False
    )


def _reshard_optimizer_states(
    states: list[dict[str, Any]],
    net: nn.Module,
    plan: ExpertParallelPlan,
    params: Sequence[nn.Parameter],
    *,
    gather: bool,
) -> None:
    """The shards' optimiser moments: gathered into whole banks (save) or sliced (load)."""
    owners = {id(p): s for s in expert_shards(net).values() for p in s.parameters()}
    for saved in states[:1]:
        for i, p in enumerate(params):
            shard = owners.get(id(p))
            if shard is None or i not in saved["state"]:
                continue
            # a new dict (map_expert_rows's): optimizer.state_dict() shares the live state
            if gather:
                saved["state"][i] = map_expert_rows(
                    saved["state"][i],
                    shard.local.num_experts,
                    lambda t: gather_expert_rows(t, plan.mesh["ep"]),
                )
            else:
                saved["state"][i] = map_expert_rows(
                    saved["state"][i], shard.num_experts, _own_rows(shard)
                )


def _own_rows(shard: ExpertShard) -> Callable[[Tensor], Tensor]:
    """A whole bank's tensor ``(E, ...)`` to this shard's experts' rows ``(L, ...)`` (a view)."""
    lo, L = shard.first_expert, shard.local.num_experts
    return lambda t: t[lo : lo + L]


def check_equal_batch_counts(num_batches: int, device: torch.device) -> None:
    """Raise on every rank unless all ranks will run ``num_batches`` batches.

    The text data modules give every rank the same number of validation batches
    (:class:`~mtl.data.text_loaders.PackedBlockLoader`); this guards other data
    modules and ``limit_val_batches`` settings, where a mismatch would hang.

    Args:
        num_batches: this rank's batch count.
        device: where the collective's tensors live (the backend's device).
    """
    n = torch.tensor([float(num_batches)], device=device)
    low, high = n.clone(), n.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(
            f"expert parallelism needs the same number of validation batches on every rank, "
            f"got {int(low.item())} to {int(high.item())}: the data module's validation loader "
            "must give every rank the same count"
        )
