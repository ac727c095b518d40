"""Gate properties of the MoE ranking models: normalisation, masks, sharing, reductions."""

import pytest
import torch

from mtl.models.rec import PLE, HoME, MMoE, OMoE, SharedBottom

from .helpers import TASKS, copied_experts, copied_gate, mix, synthetic_batch, task_loss

GROUPS = {"watch": ["click"], "inter": ["like", "comment"]}


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "omoe": OMoE(d_in=16, tasks=TASKS, num_experts=3, expert_hidden=[8]),
        "mmoe": MMoE(d_in=16, tasks=TASKS, num_experts=3, expert_hidden=[8]),
        "ple": PLE(
            d_in=16,
            tasks=TASKS,
            num_levels=2,
            num_shared_experts=2,
            num_task_experts=2,
            expert_hidden=[8],
        ),
        "home": HoME(
            d_in=16,
            tasks=TASKS,
            task_groups=GROUPS,
            num_shared_experts=2,
            num_group_experts=2,
            num_task_experts=1,
            expert_hidden=[8],
            lora_rank=4,
        ),
    }


@pytest.mark.parametrize("name", ["omoe", "mmoe", "ple", "home"])
def test_gate_weights_are_distributions_and_diagnostics_have_shapes(name: str) -> None:
    model = _models()[name]
    x, _ = synthetic_batch(n=32)
    out = model(x)
    E = len(out.expert_kinds)
    assert out.expert_outputs is not None and out.expert_outputs.shape == (E, 32, 8)
    assert set(out.gate_weights) == set(TASKS)
    for t, w_BE in out.gate_weights.items():
        assert w_BE.shape == (32, E), t
        assert torch.all(w_BE >= 0)
        torch.testing.assert_close(w_BE.sum(-1), torch.ones(32), atol=1e-6, rtol=0)


def _allowed(kinds: list[str], task: str, group: str | None = None) -> list[bool]:
    ok = {"shared", f"task:{task}"} | ({f"group:{group}"} if group else set())
    return [k in ok for k in kinds]


@pytest.mark.parametrize("name", ["ple", "home"])
def test_masked_experts_get_zero_weight_and_zero_gradient(name: str) -> None:
    model = _models()[name]
    bank = (model.levels[-1] if name == "ple" else model.task_level).experts
    x, labels = synthetic_batch(n=32)
    out = model(x)
    kinds = out.expert_kinds
    group_of = {"click": "watch", "like": "inter", "comment": "inter"}
    for t in TASKS:
        allowed = torch.tensor(_allowed(kinds, t, group_of[t] if name == "home" else None))
        w_BE = out.gate_weights[t]
        assert torch.all(w_BE[:, ~allowed] == 0), t
        assert torch.all(w_BE[:, allowed] > 0), t
        # the gradient of task t's loss reaches exactly the experts its gate allows
        loss_t = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[t], labels[t])
        params = [*bank.weights, *bank.biases]
        if name == "home":  # per-expert batch-norm scales and feature gates, split per expert
            E, H = len(kinds), bank.d_out
            params += [model.task_feature_gate.down_EDR, model.task_feature_gate.up_ERD]
            params += [bank.norms[0].weight]
        grads = list(torch.autograd.grad(loss_t, params, retain_graph=True))
        if name == "home":
            grads[-1] = grads[-1].reshape(E, H)
        for g in grads:
            assert torch.all(g[~allowed] == 0), (t, "masked expert got gradient")
            per_expert = g[allowed].flatten(1).abs().sum(-1)
            assert torch.all(per_expert > 0), (t, "allowed expert got no gradient")


def test_ple_task_gates_see_only_shared_and_own_experts() -> None:
    model = _models()["ple"]
    kinds = ["shared", "shared", *[f"task:{t}" for t in TASKS for _ in range(2)]]
    assert model.expert_kinds == kinds
    for level_idx, level in enumerate(model.levels):
        for t in TASKS:
            assert level.gates[t].expert_mask_E.tolist() == _allowed(kinds, t), (level_idx, t)
        # only intermediate levels carry the shared gate (over every expert)
        has_shared = "__shared__" in level.gates
        assert has_shared == (level_idx < len(model.levels) - 1)
        if has_shared:
            assert level.gates["__shared__"].expert_mask_E.all()


def test_ple_single_level_is_cgc_without_shared_gate() -> None:
    model = PLE(
        d_in=16,
        tasks=TASKS,
        num_levels=1,
        num_shared_experts=1,
        num_task_experts=1,
        expert_hidden=[8],
    )
    assert list(model.levels[0].gates) == TASKS
    assert model(torch.randn(4, 16)).expert_outputs.shape == (4, 4, 8)


def test_omoe_has_one_gate_shared_by_all_tasks() -> None:
    model = _models()["omoe"]
    assert len(model.mixture.gates) == 1
    out = model(torch.randn(16, 16))
    ws = [out.gate_weights[t] for t in TASKS]
    assert all(w is ws[0] for w in ws)
    # towers differ, the representation is the same: equal towers give equal logits
    model.towers.towers["like"].load_state_dict(model.towers.towers["click"].state_dict())
    out = model(torch.randn(16, 16))
    assert torch.equal(out.logits["click"], out.logits["like"])


def test_mmoe_gates_are_per_task() -> None:
    out = _models()["mmoe"](torch.randn(16, 16))
    assert not torch.allclose(out.gate_weights["click"], out.gate_weights["like"])


def test_mmoe_with_one_expert_equals_shared_bottom() -> None:
    torch.manual_seed(1)
    sb = SharedBottom(d_in=16, tasks=TASKS, bottom_hidden=[12, 8], tower_hidden=[4], dropout=0.2)
    mm = MMoE(
        d_in=16, tasks=TASKS, num_experts=1, expert_hidden=[12, 8], tower_hidden=[4], dropout=0.2
    )
    linears = [m for m in sb.bottom if isinstance(m, torch.nn.Linear)]
    bank = mm.mixture.experts
    with torch.no_grad():
        for i, lin in enumerate(linears):
            bank.weights[i][0].copy_(lin.weight.T)
            bank.biases[i][0].copy_(lin.bias)
    mm.towers.load_state_dict(sb.towers.state_dict())
    sb.eval()
    mm.eval()
    x = torch.randn(32, 16)
    a, b = sb(x), mm(x)
    assert torch.all(b.gate_weights["click"] == 1.0)
    for t in TASKS:
        torch.testing.assert_close(a.logits[t], b.logits[t], atol=1e-6, rtol=1e-5)
    # and the check can fail: a perturbed expert breaks the equality
    with torch.no_grad():
        bank.weights[0][0, 0, 0] += 1.0
    assert not torch.allclose(sb(x).logits["click"], mm(x).logits["click"])


@pytest.mark.parametrize("name", ["omoe", "mmoe", "ple", "home"])
def test_aux_loss_is_zero_by_default_and_counts_only_allowed_experts(name: str) -> None:
    x, labels = synthetic_batch(n=32)
    model = _models()[name]
    assert model(x).aux_loss.item() == 0.0
    model.aux_loss_weights = {"importance": 1.0}
    aux = model(x).aux_loss
    assert aux.item() > 0 and aux.requires_grad
    (aux + task_loss(model(x), labels)).backward()


def test_importance_loss_ignores_masked_experts() -> None:
    # a masked gate that is perfectly balanced over its allowed experts scores 0
    model = PLE(
        d_in=4,
        tasks=["a", "b"],
        num_levels=1,
        num_shared_experts=1,
        num_task_experts=1,
        expert_hidden=[4],
        aux_loss_weights={"importance": 1.0},
    )
    for gate in model.levels[0].gates.values():
        torch.nn.init.zeros_(gate.proj.weight)
        torch.nn.init.zeros_(gate.proj.bias)
    assert model(torch.randn(8, 4)).aux_loss.item() == pytest.approx(0.0, abs=1e-7)


def test_ple_equals_a_per_expert_loop_reference() -> None:
    torch.manual_seed(2)
    model = PLE(
        d_in=16,
        tasks=TASKS,
        num_levels=2,
        num_shared_experts=2,
        num_task_experts=1,
        expert_hidden=[12, 8],
        tower_hidden=[4],
    )
    x = torch.randn(32, 16)
    out = model(x)
    kinds = model.expert_kinds
    reps = {"__shared__": x, **dict.fromkeys(TASKS, x)}
    for level in model.levels:
        experts = copied_experts(level.experts)
        inputs = [reps["__shared__"] if k == "shared" else reps[k.split(":")[1]] for k in kinds]
        new = {}
        for name, gate in level.gates.items():
            allowed = (
                None
                if name == "__shared__"
                else [e for e, k in enumerate(kinds) if k in ("shared", f"task:{name}")]
            )
            new[name] = mix(experts, inputs, copied_gate(gate), reps[name], allowed)
        reps = new
    for t in TASKS:
        torch.testing.assert_close(
            out.logits[t], model.towers.towers[t](reps[t]), atol=1e-5, rtol=1e-5
        )
