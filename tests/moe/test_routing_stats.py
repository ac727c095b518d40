"""Routing statistics against naive counts: dropped tokens, experts per token, expert load.

Each statistic of :func:`mtl.moe.routing_stats` is recomputed here by a Python loop
over tokens and slots that follows the definition (a capacity queue, expert
choice's per-expert top tokens, top-p's cumulative mass), not the vectorised code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtl.moe import (
    CapacityDispatch,
    DroplessDispatch,
    ExpertBank,
    ExpertChoiceGate,
    MoELayer,
    TopKGate,
    TopPGate,
)
from mtl.training.config import compose_config
from mtl.training.expert_load import ExpertLoad
from mtl.training.train import train


def _layer(gate: torch.nn.Module, dispatch: torch.nn.Module, E: int, D: int = 8) -> MoELayer:
    return MoELayer(gate=gate, experts=ExpertBank(num_experts=E, dims=[D, D]), dispatch=dispatch)


def test_capacity_dispatch_counts_tokens_with_no_kept_slot_as_dropped() -> None:
    torch.manual_seed(0)
    T, E, k, factor = 64, 4, 2, 0.5
    layer = _layer(
        TopKGate(d_model=8, num_experts=E, k=k), CapacityDispatch(capacity_factor=factor), E
    )
    out = layer(torch.randn(T, 8) * 3)
    ids = out.routing.experts_TK.tolist()
    # naive queue: all first choices in token order, then all second choices
    capacity = math.ceil(factor * T * k / E)
    queued = [0] * E
    kept = [[False] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = ids[t][j]
            if queued[e] < capacity:
                kept[t][j] = True
            queued[e] += 1
    load = [sum(kept[t][j] for t in range(T) for j in range(k) if ids[t][j] == e) for e in range(E)]
    dropped_tokens = sum(not any(row) for row in kept)
    dropped_slots = sum(not x for row in kept for x in row)
    assert dropped_tokens > 0  # the case under test happens
    s = out.stats
    assert s.tokens_per_expert_E.tolist() == [float(n) for n in load]
    assert s.dropped_tokens.item() == dropped_tokens
    assert s.dropped_slots.item() == dropped_slots
    assert s.dropped_token_fraction.item() == pytest.approx(dropped_tokens / T)
    assert s.experts_per_token.item() == pytest.approx((T * k - dropped_slots) / T)
    assert s.as_dict("moe/")["moe/dropped_tokens"].item() == dropped_tokens


def test_expert_choice_reports_tokens_no_expert_chose_as_dropped() -> None:
    torch.manual_seed(1)
    T, E = 256, 4
    gate = ExpertChoiceGate(d_model=8, num_experts=E, capacity_factor=1.0)
    out = _layer(gate, DroplessDispatch(), E)(torch.randn(T, 8))
    probs = out.routing.probs_TE.tolist()
    # naive: each expert takes its C highest-scoring tokens
    capacity = math.ceil(T / E)
    chosen: list[set[int]] = [set() for _ in range(T)]
    for e in range(E):
        by_score = sorted(range(T), key=lambda t: probs[t][e], reverse=True)
        for t in by_score[:capacity]:
            chosen[t].add(e)
    unchosen = sum(not c for c in chosen)
    assert unchosen > 0  # some tokens get no expert: they must not read as 0 dropped
    s = out.stats
    assert s.dropped_tokens.item() == unchosen
    assert s.dropped_slots.item() == 0  # dropless: nothing the gate chose was dropped
    assert s.tokens_per_expert_E.tolist() == [float(capacity)] * E
    assert s.experts_per_token.item() == pytest.approx(sum(len(c) for c in chosen) / T)


def test_top_p_reports_mean_experts_per_token() -> None:
    torch.manual_seed(2)
    T, E, p = 128, 8, 0.6
    out = _layer(TopPGate(d_model=8, num_experts=E, p=p), DroplessDispatch(), E)(torch.randn(T, 8))
    counts = []
    for row in out.routing.probs_TE.tolist():
        # experts in decreasing probability until the mass before the next reaches p
        n, mass = 0, 0.0
        for prob in sorted(row, reverse=True):
            if n > 0 and mass >= p:
                break
            n, mass = n + 1, mass + prob
        counts.append(n)
    assert len(set(counts)) > 1  # the count varies with the router's confidence
    s = out.stats
    assert s.experts_per_token.item() == pytest.approx(sum(counts) / T)
    assert s.tokens_per_expert_E.sum().item() == sum(counts)
    assert s.dropped_tokens.item() == 0


def test_expert_load_sums_batches_per_layer() -> None:
    torch.manual_seed(3)
    E = 3
    layer = _layer(TopKGate(d_model=8, num_experts=E, k=1), DroplessDispatch(), E)
    load = ExpertLoad()
    naive = [0.0] * E
    for _ in range(3):
        out = layer(torch.randn(10, 8))
        for e in out.routing.experts_TK[:, 0].tolist():
            naive[e] += 1
        load.update({2: out.stats})
    assert load.as_dict("val/moe/") == {"val/moe/layer2/tokens_per_expert": naive}
    load.reset()
    assert load.as_dict() == {}


def test_lm_metrics_json_records_the_load_vector_and_dropped_tokens(tmp_path: Path) -> None:
    res = train(
        compose_config(
            "train",
            [
                "experiment=lm_switch",  # top-1, capacity dispatch; MoE in layer 1 of 2
                "model.n_layers=2",
                "model.moe.dispatch.capacity_factor=0.5",
                "model.moe.dispatch.min_capacity=1",
                "trainer.max_steps=2",
                "data.steps_per_epoch=2",
                "trainer.limit_val_batches=1",
                "data.block_size=32",
                "data.batch_size=8",
                "trainer.enable_progress_bar=false",
                "generate.max_new_tokens=4",
                f"output_dir={tmp_path}",
            ],
        )
    )
    routing = json.loads((tmp_path / "metrics.json").read_text())["routing"]
    assert routing.keys() == res["routing"].keys()
    for key, value in routing.items():  # scalars and per-expert lists, as train() returned them
        expected = res["routing"][key]
        assert value == pytest.approx(list(expected) if isinstance(value, list) else expected), key
    load = routing["val/moe/layer1/tokens_per_expert"]
    assert len(load) == 8 and all(n == int(n) >= 0 for n in load)
    assert max(load) <= math.ceil(0.5 * 8 * 32 / 8)  # capacity
    # top-1: every one of the batch's 8 x 32 tokens is computed by one expert or dropped
    dropped = routing["val/moe/layer1/dropped_tokens"]
    assert dropped > 0 and sum(load) + dropped == 8 * 32
    assert routing["val/moe/layer1/experts_per_token"] == pytest.approx(sum(load) / 256)
    assert "val/moe/layer0/tokens_per_expert" not in routing  # layer 0 is dense
