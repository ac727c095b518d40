"""HoME: reduction to a hierarchical MMoE, the three switchable fixes, configuration checks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mtl.models.rec import HoME, check_task_groups
from mtl.models.rec.home import FeatureGate

from .helpers import TASKS, copied_experts, copied_gate, mix

GROUPS = {"watch": ["click"], "inter": ["like", "comment"]}
OFF = {"expert_norm": False, "hierarchy_mask": False, "feature_gate": False, "self_gate": False}
SMALL = {
    "num_shared_experts": 2,
    "num_group_experts": 2,
    "num_task_experts": 1,
    "expert_hidden": [12, 8],
    "lora_rank": 4,
    "tower_hidden": [6],
}


def _home(seed: int = 0, **kw: object) -> HoME:
    torch.manual_seed(seed)
    return HoME(d_in=16, tasks=TASKS, task_groups=GROUPS, **{**SMALL, **kw})


def test_all_parts_off_equals_two_level_hierarchical_mmoe() -> None:
    model = _home(**OFF)
    x = torch.randn(32, 16)
    out = model(x)
    # Reference: level 1 is an MMoE on x with one gate per category plus a shared gate;
    # level 2 is an MMoE per task whose experts read their owner's level-1 output.
    meta_experts = copied_experts(model.meta.experts)
    task_experts = copied_experts(model.task_level.experts)
    m = {
        u: mix(meta_experts, [x] * len(meta_experts), copied_gate(g), x)
        for u, g in model.meta.gates.items()
    }
    kinds = model.expert_kinds
    owner_rep = [
        m["__shared__"]
        if k == "shared"
        else m[k.split(":")[1]]
        if k.startswith("group:")
        else m[model.group_of[k.split(":")[1]]]
        for k in kinds
    ]
    towers = copy.deepcopy(model.towers)
    for t in TASKS:
        h_t = mix(
            task_experts, owner_rep, copied_gate(model.task_level.gates[t]), m[model.group_of[t]]
        )
        torch.testing.assert_close(out.logits[t], towers.towers[t](h_t), atol=1e-5, rtol=1e-5)
        assert torch.all(out.gate_weights[t] > 0)  # no masks: every gate sees every expert
    assert model.meta_feature_gate is None and model.self_gates is None
    assert not model.meta.experts.norms and model.meta.experts.activation == "relu"


@pytest.mark.parametrize("part", list(OFF))
def test_switching_each_part_on_changes_the_output(part: str) -> None:
    base = _home(**OFF)
    on = _home(seed=1, **{**OFF, part: True})
    result = on.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    new = {
        "expert_norm": "norms",
        "hierarchy_mask": None,
        "feature_gate": "feature_gate",
        "self_gate": "self_gates",
    }[part]
    assert all(new and new in k for k in result.missing_keys), result.missing_keys
    if part == "feature_gate":  # near-identity at init (tested below): make it bite
        for fg in (on.meta_feature_gate, on.task_feature_gate):
            torch.nn.init.normal_(fg.up_ERD, std=1.0)
    base.train()
    on.train()
    x = torch.randn(32, 16)
    a, b = base(x), on(x)
    diff = max((a.logits[t] - b.logits[t]).abs().max().item() for t in TASKS)
    assert diff > 1e-3, f"{part} on did not change the output"


def test_feature_gate_starts_near_one_and_keeps_input_scale() -> None:
    torch.manual_seed(0)
    fg = FeatureGate(num_experts=4, d_model=64, rank=16)
    x = torch.randn(512, 64)
    g_ETD = fg.gates(x)
    assert g_ETD.shape == (4, 512, 64)
    assert abs(g_ETD.mean().item() - 1.0) < 0.01
    assert 0.005 < g_ETD.std().item() < 0.1  # near 1 but not constant: both factors train
    ratio = fg(x).pow(2).mean() / x.pow(2).mean()
    assert 0.97 < ratio.item() < 1.03
    # per-expert inputs give per-expert gates, matching the per-row formula
    x_ETD = torch.randn(4, 8, 64)
    e = 2
    ref = x_ETD[e] * 2 * torch.sigmoid(x_ETD[e] @ fg.down_EDR[e] @ fg.up_ERD[e])
    torch.testing.assert_close(fg(x_ETD)[e], ref)
    with pytest.raises(ValueError, match="expects"):
        fg(torch.randn(3, 8, 64))


def test_expert_norm_aligns_expert_output_scales() -> None:
    # One expert with 100x larger weights: without normalisation its outputs
    # dwarf the others' (the collapse setting); with it all experts match.
    x = torch.randn(256, 16)
    spreads = {}
    for norm in (False, True):
        model = _home(**{**OFF, "expert_norm": norm})
        with torch.no_grad():
            for w in model.meta.experts.weights:
                w[0].mul_(100.0)
        model.train()
        y_EBH = model.meta.experts.forward_all(x)
        scale_E = y_EBH.pow(2).mean(dim=(1, 2)).sqrt()
        spreads[norm] = (scale_E.max() / scale_E.min()).item()
    assert spreads[False] > 50
    assert spreads[True] < 2


def test_hierarchy_masks_follow_the_task_groups() -> None:
    model = _home()
    kinds1 = model.meta_expert_kinds
    assert kinds1 == [
        "shared",
        "shared",
        "group:watch",
        "group:watch",
        "group:inter",
        "group:inter",
    ]
    assert model.meta.gates["__shared__"].expert_mask_E.all()
    assert model.meta.gates["watch"].expert_mask_E.tolist() == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert model.meta.gates["inter"].expert_mask_E.tolist() == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]
    # level 2: global shared + own category + own task experts
    mask_like = model.task_level.gates["like"].expert_mask_E.tolist()
    assert [k for k, ok in zip(model.expert_kinds, mask_like, strict=True) if ok] == [
        "shared",
        "shared",
        "group:inter",
        "group:inter",
        "task:like",
    ]
    flat = _home(hierarchy_mask=False)
    assert all(
        g.expert_mask_E.all() for g in [*flat.meta.gates.values(), *flat.task_level.gates.values()]
    )


def test_level_two_experts_read_their_owners_representation() -> None:
    model = _home()
    owners = model.owner_E.tolist()  # 0 = shared meta rep, 1 = watch, 2 = inter
    assert owners == [0, 0, 1, 1, 2, 2, 1, 2, 2]


def test_self_gate_weighs_the_category_meta_experts() -> None:
    model = _home()
    x = torch.randn(8, 16)
    w = model.self_gates["like"](x).dense_weights()
    torch.testing.assert_close(w.sum(-1), torch.ones(8))  # two experts: softmax
    assert torch.all(w[:, :4] == 0) and torch.all(w[:, 4:] > 0)
    # one expert per category: a sigmoid, so the residual can be turned down
    one = HoME(d_in=16, tasks=TASKS, task_groups=GROUPS, **{**SMALL, "num_group_experts": 1})
    s = one.self_gates["click"](x).dense_weights()
    assert torch.all((s[:, 2] > 0) & (s[:, 2] < 1)) and torch.all(s[:, [0, 1, 3]] == 0)


def test_self_gate_adds_the_gated_category_meta_expert_as_residual() -> None:
    # One expert per category (sigmoid self gate) and linear towers make the
    # residual visible in the logit: logit_on - logit_off = w_tower . s * Meta_e(x).
    kw = {**SMALL, "num_group_experts": 1, "tower_hidden": [], "feature_gate": False}
    on = _home(**kw)
    off = _home(**{**kw, "self_gate": False})
    off.load_state_dict(on.state_dict(), strict=False)
    x = torch.randn(16, 16)
    gate = on.self_gates["click"]
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.bias.fill_(-30.0)  # s = sigmoid(-30): the residual is switched off
        torch.testing.assert_close(on(x).logits["click"], off(x).logits["click"])
        gate.proj.bias.fill_(30.0)  # s = 1: the whole category expert is added
        y1_EBH = on.meta.experts.forward_all(x)
        watch = on.meta_expert_kinds.index("group:watch")
        head = on.towers.towers["click"].head
        expected = off(x).logits["click"] + y1_EBH[watch] @ head.weight[0]
        torch.testing.assert_close(on(x).logits["click"], expected, atol=1e-5, rtol=1e-5)
        # the other category's task is untouched by click's self gate
        gate_like = on.self_gates["like"]
        gate_like.proj.weight.zero_()
        gate_like.proj.bias.fill_(-30.0)
        torch.testing.assert_close(on(x).logits["like"], off(x).logits["like"])


def test_default_is_one_group_and_task_experts_are_optional() -> None:
    model = HoME(d_in=8, tasks=["a", "b"], expert_hidden=[8], lora_rank=2, num_task_experts=0)
    assert model.task_groups == {"all": ["a", "b"]}
    assert "task:a" not in model.expert_kinds
    assert model(torch.randn(4, 8)).logits["b"].shape == (4,)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            {"watch": ["click", "share"], "inter": ["like", "comment", "follow"]},
            r"unknown tasks \['follow', 'share'\]",
        ),
        ({"watch": ["click"], "inter": ["like"]}, r"tasks \['comment'\] are in no task group"),
        (
            {"watch": ["click", "like"], "inter": ["like", "comment"]},
            r"\['like'\] appear in more than one",
        ),
        ({"watch": []}, "must list at least one task"),
        ({}, "must map category names"),
    ],
)
def test_bad_task_groups_are_named(groups: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HoME(d_in=8, tasks=TASKS, task_groups=groups)
    with pytest.raises(ValueError, match=message):
        check_task_groups(groups, TASKS)


def test_hydra_style_containers_are_accepted() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"groups": GROUPS, "hidden": [8]})
    model = HoME(
        d_in=8,
        tasks=OmegaConf.create(TASKS),
        task_groups=cfg.groups,
        expert_hidden=cfg.hidden,
        lora_rank=2,
    )
    assert model.task_groups == GROUPS
    assert F.softplus(model(torch.randn(4, 8)).logits["like"]).shape == (4,)
