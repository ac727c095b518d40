"""The token exchange of expert parallelism: a differentiable ``all_to_all_single`` with uneven splits.

Expert parallelism sends each routed row to the rank that holds its expert
and brings the expert's output back (GShard, Megatron, torchtitan). Both legs
are ``torch.distributed.all_to_all_single`` calls with per-rank row counts;
the backward of an exchange is the same exchange with the splits swapped, so
gradients of the rows travel back to the rank that sent them.

Process groups are given as a :class:`torch.distributed.ProcessGroup` or as a
one-dimensional :class:`~torch.distributed.device_mesh.DeviceMesh` (a mesh
slice such as ``mesh["ep"]``), as torchtitan names them; ``None`` is the
default (world) group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

GroupLike = dist.ProcessGroup | DeviceMesh | None
"""A process group, a one-dimensional device mesh (slice), or None for the world group."""


def resolve_group(group: GroupLike) -> dist.ProcessGroup:
    """The :class:`~torch.distributed.ProcessGroup` behind ``group``.

    Args:
        group: a process group, a 1-D device mesh (``mesh["ep"]`` of a larger
            mesh), or None for the default group.

    Raises:
        ValueError: a mesh with more than one dimension (name the dimension).
        RuntimeError: torch.distributed is not initialised.

    Example:
        >>> resolve_group(None)  # doctest: +SKIP
        <torch.distributed.distributed_c10d.ProcessGroup ...>
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs torch.distributed initialised (init_process_group) "
            "before the process group is used"
        )
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"expected a 1-D device mesh for the expert-parallel group, got dims "
                f"{group.mesh_dim_names or group.ndim}: pass one dimension, e.g. mesh['ep']"
            )
        return group.get_group()
    return dist.group.WORLD if group is None else group


class _AllToAllRows(torch.autograd.Function):
    """Rows of ``x`` scattered to the ranks by ``send_splits``; the backward is the reverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_ND: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup,
    ) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_MD: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        # what came from rank s goes back to rank s: splits swapped
        return _exchange(grad_MD, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _exchange(
    x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(
        out_MD,
        x_ND.contiguous(),
        output_split_sizes=recv_splits,
        input_split_sizes=send_splits,
        group=group,
    )
    return out_MD


def all_to_all_rows(
    x_ND: Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: dist.ProcessGroup,
) -> Tensor:
    """Send ``x_ND``'s rows to the ranks of ``group``, differentiably.

    The first ``send_splits[0]`` rows go to rank 0 of the group, the next
    ``send_splits[1]`` to rank 1, and so on; the result holds the rows received,
    ``recv_splits[s]`` of them from rank ``s``, in rank order. Every rank must
    call it, with splits that agree (what rank ``r`` sends to ``s`` is what ``s``
    receives from ``r``).

    Args:
        x_ND: ``(N, ...)`` rows grouped by destination rank, ``N = sum(send_splits)``.
        send_splits: rows sent to each rank.
        recv_splits: rows received from each rank.
        group: the process group.

    Returns:
        ``(M, ...)``, ``M = sum(recv_splits)``; its gradient flows back to the senders.

    Example:
        >>> y = all_to_all_rows(x, [2, 1], [2, 3], group)  # doctest: +SKIP
    """
    send, recv = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    if sum(send) != x_ND.shape[0]:
        raise ValueError(f"send_splits sum to {sum(send)} but x has {x_ND.shape[0]} rows")
    return _AllToAllRows.apply(x_ND, send, recv, group)


def exchange_counts(send_counts_RL: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Tell every rank how many rows it will receive: an equal-split ``all_to_all`` of counts.

    Args:
        send_counts_RL: ``(R, L)`` int64, rows this rank sends to local expert
            ``l`` of rank ``r`` (``R`` ranks in ``group``, ``L`` experts each).

    Returns:
        ``(R, L)`` int64, rows this rank receives from rank ``r`` for its own
        local expert ``l``.

    Example:
        >>> recv_RL = exchange_counts(counts_E.view(R, L), group)  # doctest: +SKIP
    """
    recv_RL = torch.empty_like(send_counts_RL)
    dist.all_to_all_single(recv_RL, send_counts_RL.contiguous(), group=group)
    return recv_RL
