"""Inputs known through their products with a weight: ``x @ W`` without forming ``x``.

A dense-mixing layer's first operation on its shared input is linear: every
expert's first projection and every gate's logits are ``x @ W``. Some inputs can
produce that product far more cheaply than by materialising ``x``. The
embedded input of a tabular ranker is the main case: ``x`` is the
concatenation of ``F`` embedding lookups, so ``x @ W = sum_f table_f[i_f] @ W_f``;
projecting each (small) table once per step and summing ``F`` projected rows per
sample costs ``V * d * N + B * F * N`` instead of ``B * F * d * N``.
:class:`~mtl.models.rec.embedding.FeatureEmbedding` provides such an input.

:class:`~mtl.moe.MultiGateMixture` accepts either a tensor or a
:class:`LinearInput`; :func:`project` and :func:`materialize` treat both alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class LinearInput(Protocol):
    """Rows ``x (T, D)`` that can be multiplied by a weight without being formed.

    Implementations must return products in float32 (routing logits are taken
    from them) and must be differentiable in ``w_DN`` and in whatever
    parameters ``x`` depends on.

    Attributes:
        num_rows: ``T``.
        width: ``D``.
        device: where the rows live.

    Example:
        >>> class Dense:
        ...     def __init__(self, x): self.x = x
        ...     num_rows = property(lambda self: self.x.shape[0])
        ...     width = property(lambda self: self.x.shape[1])
        ...     device = property(lambda self: self.x.device)
        ...     def matmul(self, w_DN): return self.x.float() @ w_DN.float()
        ...     def materialize(self): return self.x
        >>> isinstance(Dense(torch.ones(2, 3)), LinearInput)
        True
    """

    @property
    def num_rows(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def matmul(self, w_DN: Tensor) -> Tensor:
        """``x @ w_DN``: ``(D, N) -> (T, N)`` float32."""
        ...

    def materialize(self) -> Tensor:
        """``x`` itself, ``(T, D)``."""
        ...


def materialize(x: Tensor | LinearInput) -> Tensor:
    """``x`` as a tensor."""
    return x if isinstance(x, Tensor) else x.materialize()


def input_width(x: Tensor | LinearInput) -> int:
    """``D`` of a tensor ``(T, D)`` or of a :class:`LinearInput`."""
    return x.shape[-1] if isinstance(x, Tensor) else x.width


def project(x: Tensor | LinearInput, w_DN: Tensor) -> Tensor:
    """``x @ w_DN`` for a tensor or a :class:`LinearInput`: ``(T, D), (D, N) -> (T, N)``."""
    return x @ w_DN if isinstance(x, Tensor) else x.matmul(w_DN)
