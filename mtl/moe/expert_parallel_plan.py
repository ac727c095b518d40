"""Expert parallelism inside data-parallel training: process groups, gradients, clipping.

With ``W`` processes and expert parallelism ``N`` (``N`` divides ``W``), the
ranks form a ``(W / N, N)`` device mesh with dimensions ``("dp", "ep")``
(torchtitan's layout): each row of ``N`` consecutive ranks shards the experts
(``mesh["ep"]``), and the ranks holding the same experts form a column
(``mesh["dp"]``). Everything but the routed experts is replicated on all ``W``
ranks and averaged by DDP.

Gradients. Every rank's loss is the mean over its own tokens, and DDP averages
the replicated gradients over ``W`` ranks: the gradient of the global mean
loss. A shard's gradient already sums the contributions of every token its
``ep`` row sent it (the exchange's backward); summed over its ``dp`` column and
divided by ``W`` it is the same global-mean gradient
(:meth:`ExpertParallelPlan.reduce_expert_grads_`). DDP must not touch the
shards (they differ per rank): their names go into DDP's ignore list.
Gradient clipping must see the norm of the whole model, every shard included
(:meth:`ExpertParallelPlan.clip_grad_norm_`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtl.moe.expert_parallel import parallelize_experts, sharded_parameters


class ExpertParallelPlan:
    """Experts sharded over groups of ``expert_parallel`` ranks, the rest data-parallel.

    Collective: every rank builds the plan (it creates the process groups).

    Args:
        expert_parallel: ``N``, ranks per expert-parallel group; divides the world size.
        device_type: the mesh's device type; None: ``"cuda"`` where CUDA is
            available, else ``"cpu"`` (gloo).

    Attributes:
        mesh: the ``(W / N, N)`` :class:`~torch.distributed.device_mesh.DeviceMesh`,
            dimensions ``("dp", "ep")``.
        world_size: ``W``.

    Example:
        >>> import torch.distributed as dist
        >>> from functools import partial
        >>> from mtl.models.lm import MoEFFN, TransformerLM
        >>> from mtl.moe import SwiGLUExperts, TopKGate
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> lm = TransformerLM(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16,
        ...                    moe=MoEFFN(num_experts=4, gate=partial(TopKGate, k=2),
        ...                               experts=partial(SwiGLUExperts, d_hidden=8)))
        >>> plan = ExpertParallelPlan(expert_parallel=1)
        >>> plan.apply(lm)  # names for set_ddp_ignore before DistributedDataParallel(lm)
        ['layers.0.ffn.experts.local.w_gate', 'layers.0.ffn.experts.local.w_up', 'layers.0.ffn.experts.local.w_down']
        >>> ids = torch.randint(0, 10, (2, 5))
        >>> lm(ids, ids).loss.backward()
        >>> plan.reduce_expert_grads_(lm)  # after the last backward, before the step
        >>> dist.destroy_process_group()
    """

    def __init__(self, *, expert_parallel: int, device_type: str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"expert_parallel={expert_parallel} needs torch.distributed initialised "
                "(a multi-process run, e.g. trainer=ddp)"
            )
        world = dist.get_world_size()
        if expert_parallel < 1 or world % expert_parallel != 0:
            raise ValueError(
                f"expert_parallel={expert_parallel} must divide the number of processes ({world})"
            )
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.world_size = world
        self.expert_parallel = expert_parallel
        self.mesh: DeviceMesh = init_device_mesh(
            device_type, (world // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep")
        )

    def apply(self, net: nn.Module) -> list[str]:
        """Shard ``net``'s routed experts over ``mesh["ep"]``; the names DDP must ignore.

        The auxiliary router losses count every rank's tokens (the world,
        :mod:`mtl.moe.group_counts`), so the ranks' losses average to the
        single-process loss of the global batch.
        """
        return parallelize_experts(net, group=self.mesh["ep"], count_group=dist.group.WORLD)

    @torch.no_grad()
    def reduce_expert_grads_(self, net: nn.Module) -> None:
        """Turn the shards' summed gradients into the global-mean loss's: sum over ``dp``, divide by ``W``.

        Call once per optimiser step, after the last backward (after gradient accumulation).
        """
        replicas = self.mesh["dp"].get_group()
        for p in sharded_parameters(net):
            if p.grad is None:
                continue
            if self.mesh["dp"].size() > 1:
                dist.all_reduce(p.grad, group=replicas)
            p.grad.div_(self.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, net: nn.Module, max_norm: float) -> Tensor:
        """Clip all gradients by the 2-norm of the whole model's (every shard's included).

        As :func:`torch.nn.utils.clip_grad_norm_` on the unsharded model: the
        replicated gradients (equal on every rank after DDP) count once, each
        shard's once (summed over ``mesh["ep"]``).

        Returns:
            the total norm before clipping.
        """
        shard_ids = {id(p) for p in sharded_parameters(net)}
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        sharded = [p.grad for p in sharded_parameters(net) if p.grad is not None]
        replicated = [
            p.grad for p in net.parameters() if p.grad is not None and id(p) not in shard_ids
        ]
        sq = _sum_sq(sharded, grads[0] if grads else None)
        dist.all_reduce(sq, group=self.mesh["ep"].get_group())
        total = (sq + _sum_sq(replicated, sq)).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total


def _sum_sq(grads: Iterable[Tensor], like: Tensor | None) -> Tensor:
    out = torch.zeros((), dtype=torch.float32, device=None if like is None else like.device)
    for g in grads:
        out = out + g.float().square().sum()
    return out


def set_ddp_ignore(module: nn.Module, names: Iterable[str]) -> None:
    """Tell :class:`~torch.nn.parallel.DistributedDataParallel` to leave these parameters and buffers alone.

    DDP reads the list when it wraps ``module`` (names qualified in ``module``):
    it neither broadcasts them from rank 0 nor averages their gradients.

    Example:
        >>> set_ddp_ignore(lm, plan.apply(lm))  # doctest: +SKIP
    """
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))
