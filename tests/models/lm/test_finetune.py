"""Freezing helpers: train only the experts, or freeze them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mtl.models.lm import (
    TransformerLM,
    count_parameters,
    freeze_all_but_experts,
    freeze_experts,
    unfreeze_all,
)


def _expert_numel(model: TransformerLM, *, shared: bool) -> int:
    total = 0
    for layer in model.moe_layers().values():
        total += sum(p.numel() for p in layer.experts.parameters())
        if shared and layer.shared is not None:
            total += sum(p.numel() for p in layer.shared.parameters())
    return total


def _router_numel(model: TransformerLM) -> int:
    return sum(
        sum(p.numel() for p in layer.gate.parameters()) for layer in model.moe_layers().values()
    )


def test_freeze_all_but_experts_counts(build_preset: Callable[..., TransformerLM]) -> None:
    model = build_preset("lm_deepseekmoe")  # has shared experts and a dense first layer
    total = count_parameters(model).total
    counts = freeze_all_but_experts(model, include_router=False)
    assert counts.trainable == _expert_numel(model, shared=True)
    assert counts.total == total
    assert not model.embed.weight.requires_grad
    assert not any(p.requires_grad for p in model.layers[0].parameters())  # the dense layer
    routed_only = freeze_all_but_experts(model, include_shared=False, include_router=False)
    assert routed_only.trainable == _expert_numel(model, shared=False) < counts.trainable


def test_routers_train_by_default_with_the_experts(
    build_preset: Callable[..., TransformerLM],
) -> None:
    """After upcycling the router is new: expert-only fine-tuning keeps it trainable."""
    model = build_preset("lm_deepseekmoe")
    counts = freeze_all_but_experts(model)
    assert _router_numel(model) > 0
    assert counts.trainable == _expert_numel(model, shared=True) + _router_numel(model)
    assert all(layer.gate.proj.weight.requires_grad for layer in model.moe_layers().values())
    assert not model.embed.weight.requires_grad


def test_freeze_experts_counts(build_preset: Callable[..., TransformerLM]) -> None:
    model = build_preset("lm_mixtral")
    total = count_parameters(model).total
    counts = freeze_experts(model)
    assert counts.frozen == _expert_numel(model, shared=True)
    assert counts.trainable == total - counts.frozen
    assert model.embed.weight.requires_grad
    assert all(layer.gate.proj.weight.requires_grad for layer in model.moe_layers().values())
    assert unfreeze_all(model).frozen == 0


def test_tied_embeddings_counted_once(build_preset: Callable[..., TransformerLM]) -> None:
    model = build_preset("lm_dense")
    assert model.lm_head.weight is model.embed.weight
    assert count_parameters(model).total == model.parameter_counts()["total"]


def test_dense_model_has_no_experts_to_freeze(build_preset: Callable[..., TransformerLM]) -> None:
    with pytest.raises(ValueError, match="no MoE layer"):
        freeze_experts(build_preset("lm_dense"))
