"""bin_counts: the sync-free counting used by dispatch, losses and routing statistics."""

from __future__ import annotations

import pytest
import torch

from mtl.moe import bin_counts


def _naive(ids: torch.Tensor, n: int, weights: torch.Tensor | None) -> torch.Tensor:
    """One bin at a time."""
    flat = ids.reshape(-1).tolist()
    w = [1] * len(flat) if weights is None else weights.reshape(-1).tolist()
    out = [0.0] * n
    for i, wi in zip(flat, w, strict=True):
        out[i] += wi
    return torch.tensor(out)


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_counts_equal_a_per_bin_loop_on_both_paths(scatter: bool, weighted: bool) -> None:
    torch.manual_seed(0)
    n = 9
    ids = torch.randint(0, n - 2, (37, 3))  # the last two bins stay empty
    weights = torch.rand(37, 3) if weighted else None
    out = bin_counts(ids, n, weights, scatter=scatter)
    assert out.shape == (n,)
    assert out.dtype == (torch.float32 if weighted else torch.int64)
    torch.testing.assert_close(out.double(), _naive(ids, n, weights).double())
    assert out[-2:].sum() == 0


def test_cpu_path_rejects_ids_past_the_last_bin() -> None:
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        bin_counts(torch.tensor([0, 5]), 3)
