"""torch.compile over MoE layers: same numbers as eager, no recompiles, breaks only at the dispatch.

The ``aot_eager`` backend traces exactly what inductor would receive (dynamo +
AOTAutograd) without generating C++, so these tests stay fast; the LM test in
``tests/training/test_compile.py`` runs inductor itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from mtl.moe import (
    CapacityDispatch,
    DenseDispatch,
    DenseSoftmaxGate,
    DroplessDispatch,
    ExpertBank,
    ExpertChoiceGate,
    MoELayer,
    SigmoidBiasGate,
    SwiGLUExperts,
    TopKGate,
    TopPGate,
)
from mtl.moe.grouped import grouped_mm
from mtl.moe.routing import bin_counts

D, E = 16, 8
LOSSES = {"load_balance": 0.01, "z_loss": 1e-3}

LAYERS: dict[str, Callable[[], MoELayer]] = {
    # SwiGLU experts on expert-sorted rows (the per-expert loop reads the counts)
    "dropless_swiglu": lambda: MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=2),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=32),
        dispatch=DroplessDispatch(),
        aux_loss_weights=LOSSES,
    ),
    # MLP experts on expert-sorted rows
    "dropless_mlp": lambda: MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=2),
        experts=ExpertBank(num_experts=E, dims=[D, 32, D]),
        dispatch=DroplessDispatch(),
        aux_loss_weights=LOSSES,
    ),
    # invalid slots: the valid prefix is read back to the host
    "dropless_top_p": lambda: MoELayer(
        gate=TopPGate(d_model=D, num_experts=E, p=0.5),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=32),
        dispatch=DroplessDispatch(),
        aux_loss_weights={"load_balance": 0.01},
    ),
    "expert_choice": lambda: MoELayer(
        gate=ExpertChoiceGate(d_model=D, num_experts=E, capacity_factor=2.0),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=32),
        dispatch=DroplessDispatch(),
    ),
    "sigmoid_bias": lambda: MoELayer(
        gate=SigmoidBiasGate(d_model=D, num_experts=E, k=2),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=32),
        dispatch=DroplessDispatch(),
    ),
    "capacity": lambda: MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=1),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=32),
        dispatch=CapacityDispatch(capacity_factor=1.0),
        aux_loss_weights=LOSSES,
    ),
    "dense": lambda: MoELayer(
        gate=DenseSoftmaxGate(d_model=D, num_experts=E),
        experts=ExpertBank(num_experts=E, dims=[D, 32, D]),
        dispatch=DenseDispatch(),
    ),
}
# the layers whose dispatch reads per-expert counts back and so runs between graphs
EAGER_DISPATCH = {
    "dropless_swiglu",
    "dropless_mlp",
    "dropless_top_p",
    "expert_choice",
    "sigmoid_bias",
}


def _step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = layer(x)
    (out.output.square().mean() + out.aux_loss).backward()
    return out.output.detach(), out.aux_loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compiled_layer_matches_eager_without_recompiling(name: str) -> None:
    torch.manual_seed(0)
    eager = LAYERS[name]()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    for i in range(3):
        # a new input each time routes differently: new counts must not recompile
        x = torch.randn(4, 24, D, generator=torch.Generator().manual_seed(i), requires_grad=True)
        x_c = x.detach().clone().requires_grad_(True)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            y, aux = _step(eager, x)
            y_c, aux_c = _step(compiled, x_c)
        torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux_c, aux, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x_c.grad, x.grad, rtol=1e-5, atol=1e-6)
        for (pname, p), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-4, atol=1e-6, msg=pname)
        eager.zero_grad()
        compiled.zero_grad()
    breaks = counters["graph_break"]
    other = [
        reason.splitlines()[0] for reason in breaks if "DroplessDispatch.forward" not in reason
    ]
    assert other == [], f"graph breaks besides the dispatch: {other}"
    assert bool(breaks) == (name in EAGER_DISPATCH)


def test_bin_counts_traces_without_a_dynamic_shape() -> None:
    ids = torch.tensor([[0, 3], [3, 3], [1, 0]])
    counted = torch.compile(lambda i: bin_counts(i, 5), backend="aot_eager", fullgraph=True)
    assert counted(ids).tolist() == [2, 1, 0, 3, 0]


def test_grouped_mm_compiles_in_float32_on_cpu() -> None:
    # grouped_mm's meta function accepts bf16 only, so the traced path must not take it
    torch.manual_seed(0)
    x, w = torch.randn(7, 16), torch.randn(3, 16, 8)
    counts = torch.tensor([2, 0, 5])
    y = torch.compile(grouped_mm, backend="aot_eager")(x, w, counts)
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
