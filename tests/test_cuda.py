"""CUDA paths of mtl.moe, the language model and the rec input layer, against CPU references.

Every test here is marked ``gpu`` (deselected by default) and skips where torch
sees no CUDA device. They import torch and mtl alone (no Hydra, polars or
Lightning: ``tests/test_imports.py``), so a bare GPU machine with torch runs
them from a copy of the repository::

    PYTHONPATH=. python -m pytest -m gpu tests/test_cuda.py

``benchmarks/device_check.sh`` runs them with the bf16 layer benchmark.
``MTL_TEST_DEVICE=cpu`` runs the same comparisons on CPU (the sync check
skips there): a check of the tests themselves, not of CUDA.
"""

from __future__ import annotations

import copy
import os
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from mtl.data.spec import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.models.lm import MoEFFN, TransformerLM
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.mmoe import MMoE
from mtl.models.rec.ranker import Ranker
from mtl.moe import CapacityDispatch, DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
from mtl.moe.routing import RoutingResult

from .moe.reference import loop_moe

DEVICE = torch.device(os.environ.get("MTL_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(8, 2), (64, 8)]  # (E, k)


def _layer(E: int, k: int, D: int = 64, H: int = 96) -> MoELayer:
    torch.manual_seed(E + k)
    return MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=k, renormalize=True),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H),
        dispatch=DroplessDispatch(),
        aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001},
    )


def _fixed(routing: RoutingResult, device: torch.device) -> tuple[RoutingResult, Tensor]:
    """The same decision with its combine weights as a float32 leaf on ``device``."""
    w_TK = routing.weights_TK.detach().float().to(device).requires_grad_()
    fixed = RoutingResult(
        weights_TK=w_TK,
        experts_TK=routing.experts_TK.to(device),
        logits_TE=routing.logits_TE.detach().to(device),
        probs_TE=routing.probs_TE.detach().to(device),
    )
    return fixed, w_TK


@pytest.mark.parametrize(("E", "k"), SHAPES)
@pytest.mark.parametrize(
    ("dtype", "dispatch"),
    [
        (torch.bfloat16, DroplessDispatch()),  # torch grouped_mm kernel
        (torch.float32, DroplessDispatch()),  # fp32: one matmul per expert
        (torch.float32, CapacityDispatch(capacity_factor=1.0)),  # drops tokens
    ],
    ids=["bf16-dropless", "fp32-dropless", "fp32-capacity"],
)
def test_dispatch_on_the_device_matches_the_per_expert_loop(
    E: int, k: int, dtype: torch.dtype, dispatch: nn.Module
) -> None:
    layer = _layer(E, k)
    T = 512
    x = torch.randn(T, 64)
    bank = copy.deepcopy(layer.experts).to(DEVICE, dtype)
    x_dev = x.to(DEVICE, dtype).requires_grad_()
    routing, w_dev = _fixed(layer.gate(x), DEVICE)
    # the reference: fp32 on CPU from the same (rounded) weights, inputs and decision
    ref_bank = copy.deepcopy(bank).float().cpu()
    x_ref = x_dev.detach().float().cpu().requires_grad_()
    w_ref = w_dev.detach().cpu().requires_grad_()

    res = dispatch(x_dev, routing, bank)
    g = torch.randn(T, 64)
    (res.output_TD.float() * g.to(DEVICE)).sum().backward()
    keep = getattr(res, "kept_TK", None)
    ref = loop_moe(
        ref_bank,
        x_ref,
        w_ref,
        routing.experts_TK.cpu(),
        None if keep is None else keep.cpu(),
    )
    (ref * g).sum().backward()

    tol = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(res.output_TD.float().cpu(), ref, **tol)
    torch.testing.assert_close(x_dev.grad.float().cpu(), x_ref.grad, **tol)
    torch.testing.assert_close(w_dev.grad.cpu(), w_ref.grad, **tol)
    for p, q in zip(bank.parameters(), ref_bank.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad.float().cpu(), q.grad, **tol)


@pytest.mark.skipif(not ON_CUDA, reason="host syncs exist on CUDA only")
@pytest.mark.parametrize(("E", "k"), SHAPES)
def test_bf16_moe_layer_step_makes_no_host_sync(E: int, k: int) -> None:
    layer = _layer(E, k).to(DEVICE, torch.bfloat16)
    x = torch.randn(1024, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1024, 64, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait now raises
    try:
        out = layer(x)
        ((out.output.float() * g).sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def _tiny_moe_lm(num_experts: int) -> TransformerLM:
    """A 2-layer top-2 SwiGLU MoE LM, seeded."""
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=num_experts,
        gate=partial(TopKGate, k=2, renormalize=True),
        experts=partial(SwiGLUExperts, d_hidden=32),
        aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001},
    )
    return TransformerLM(
        vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe=moe
    )


def test_lm_training_step_on_the_device_matches_cpu() -> None:
    cpu = _tiny_moe_lm(4)
    dev = copy.deepcopy(cpu).to(DEVICE)
    idx = torch.randint(0, 50, (4, 16))
    targets = torch.randint(0, 50, (4, 16))
    losses = []
    for model, d in ((cpu, torch.device("cpu")), (dev, DEVICE)):
        out = model(idx.to(d), targets.to(d))
        assert out.loss is not None
        (out.loss + out.aux_loss).backward()
        losses.append(out.loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), dev.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def _rec_spec() -> FeatureSpec:
    return FeatureSpec(
        categorical=[
            CategoricalFeature("user", 3000, 16),  # own table, gathered: more rows than B
            CategoricalFeature("city", 40, 8),  # folded
            CategoricalFeature("device", 4, 8),  # folded
        ],
        numeric=[NumericFeature("price", 0.0, 1.0)],
        tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")],
    )


def test_rec_folded_input_and_mmoe_on_the_device_match_cpu() -> None:
    torch.manual_seed(1)
    spec = _rec_spec()
    emb = FeatureEmbedding(spec=spec)
    model = MMoE(
        d_in=emb.output_dim,
        tasks=["click", "like"],
        num_experts=4,
        expert_hidden=[32],
        tower_hidden=[16],
        expert_norm=True,
        tower_norm=True,
        gate_norm=True,
    )
    B = 256
    assert emb.folds(B) == [True, False]  # tables by width: city and device fold, user is gathered
    cat = torch.stack([torch.randint(0, f.vocab_size + 1, (B,)) for f in spec.categorical], 1)
    num = torch.randn(B, 1)
    results = []
    for d in (torch.device("cpu"), DEVICE):
        e, m = copy.deepcopy(emb).to(d), copy.deepcopy(model).to(d)
        out = Ranker(embedding=e, model=m)(cat.to(d), num.to(d))
        loss = sum(out.logits[t].float().square().mean() for t in ("click", "like"))
        loss.backward()
        grads = [p.grad.cpu() for p in [*e.parameters(), *m.parameters()] if p.grad is not None]
        results.append(({t: v.detach().cpu() for t, v in out.logits.items()}, grads))
    (logits_cpu, grads_cpu), (logits_dev, grads_dev) = results
    for t in logits_cpu:
        torch.testing.assert_close(logits_dev[t], logits_cpu[t], rtol=1e-4, atol=1e-5)
    assert len(grads_dev) == len(grads_cpu) > 0
    for a, b in zip(grads_dev, grads_cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _backend_or_skip(backend: str) -> str:
    if backend == "inductor" and ON_CUDA:
        pytest.importorskip("triton", reason="inductor on CUDA needs triton")
    return backend


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_moe_lm_on_the_device_matches_eager(backend: str) -> None:
    """``mtl train compile=true`` on the device: same loss and gradients, no recompiles."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _tiny_moe_lm(8).to(DEVICE)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=_backend_or_skip(backend))
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        idx = torch.randint(0, 50, (8, 16), generator=gen).to(DEVICE)
        targets = torch.randint(0, 50, (8, 16), generator=gen).to(DEVICE)
        losses = []
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            for model in (eager, compiled):
                model.zero_grad()
                # float32: bf16 rounding could flip near-tied routing choices between the two
                out = model(idx, targets)
                assert out.loss is not None
                (out.loss + out.aux_loss).backward()
                losses.append(out.loss.detach().float().cpu())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
