"""LoRA adapters: per-expert updates against a naive loop, freezing, merging, adapter files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.models.lm.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_config,
    add_lora,
    has_lora,
    load_adapters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_adapters,
)
from mtl.moe import SwiGLUExperts, TopKGate
from mtl.moe.lora import LoRASwiGLUExperts


def _moe_lm() -> TransformerLM:
    moe = MoEFFN(
        num_experts=4, gate=partial(TopKGate, k=2), experts=partial(SwiGLUExperts, d_hidden=32)
    )
    return TransformerLM(
        vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe, moe_layers=[1]
    )


def _randomise_adapters(model: nn.Module) -> None:
    # B starts at zero; a non-zero B makes the update visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)


def _naive_expert(bank: LoRASwiGLUExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` with its adapted weights written out: ``W + (alpha / r) A B``."""

    def w(name: str) -> torch.Tensor:
        base = getattr(bank, f"w_{name}")[e]
        return (
            base
            + bank.scaling * getattr(bank, f"lora_A_{name}")[e] @ getattr(bank, f"lora_B_{name}")[e]
        )

    return (F.silu(x @ w("gate")) * (x @ w("up"))) @ w("down")


@pytest.mark.parametrize("rank", [1, 4])
def test_expert_adapters_match_a_per_expert_loop(rank: int) -> None:
    bank = SwiGLUExperts(num_experts=3, d_model=8, d_hidden=12)
    lora = LoRASwiGLUExperts.from_bank(bank, rank=rank, alpha=2.0)
    _randomise_adapters(lora)
    x = torch.randn(7, 8)
    dense = lora.forward_all(x)
    per_expert = torch.stack([_naive_expert(lora, e, x) for e in range(3)])
    torch.testing.assert_close(dense, per_expert, atol=1e-5, rtol=1e-5)
    counts = torch.tensor([2, 0, 5])
    grouped = lora.forward_grouped(x, counts)
    blocks = [_naive_expert(lora, e, xs) for e, xs in enumerate(x.split([2, 0, 5]))]
    torch.testing.assert_close(grouped, torch.cat(blocks), atol=1e-5, rtol=1e-5)
    # per-expert inputs (E, T, D), the capacity dispatch's layout
    x_ETD = torch.randn(3, 4, 8)
    per_input = torch.stack([_naive_expert(lora, e, x_ETD[e]) for e in range(3)])
    torch.testing.assert_close(lora.forward_all(x_ETD), per_input, atol=1e-5, rtol=1e-5)


def test_expert_adapter_gradients_reach_only_routed_experts() -> None:
    bank = SwiGLUExperts(num_experts=3, d_model=8, d_hidden=12)
    lora = LoRASwiGLUExperts.from_bank(bank, rank=2, alpha=2.0)
    _randomise_adapters(lora)
    lora.forward_grouped(torch.randn(5, 8), torch.tensor([2, 0, 3])).sum().backward()
    for name in ("gate", "up", "down"):
        g = getattr(lora, f"lora_A_{name}").grad
        assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0
        assert g[1].abs().sum() == 0  # expert 1 got no rows


def test_adapted_model_starts_equal_and_merge_keeps_outputs() -> None:
    lm = _moe_lm()
    x = torch.randint(0, 40, (3, 9))
    before = lm(x).logits
    names = add_lora(lm, rank=4, alpha=8.0)
    assert "layers.1.ffn.experts" in names and "layers.0.attn.q_proj" in names
    torch.testing.assert_close(lm(x).logits, before, atol=0.0, rtol=0.0)
    _randomise_adapters(lm)
    adapted = lm(x).logits
    assert (adapted - before).abs().max() > 1e-2
    merged_names = merge_lora(lm)
    assert sorted(merged_names) == sorted(names) and not has_lora(lm)
    torch.testing.assert_close(lm(x).logits, adapted, atol=1e-5, rtol=1e-5)
    # merged weights load into a model built without adapters
    plain = _moe_lm()
    plain.load_state_dict(lm.state_dict())
    torch.testing.assert_close(plain(x).logits, adapted, atol=1e-5, rtol=1e-5)


def test_linear_adapter_and_merge() -> None:
    base = nn.Linear(6, 5)
    lora = LoRALinear.from_linear(base, rank=3, alpha=6.0)
    _randomise_adapters(lora)
    x = torch.randn(4, 6)
    expected = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=1e-6)
    y = lora(x).detach()
    torch.testing.assert_close(lora.merged()(x), y, atol=1e-5, rtol=1e-5)


def test_freezing_trains_adapters_only() -> None:
    lm = _moe_lm()
    add_lora(lm, rank=2, alpha=2.0, targets=("q_proj", "v_proj", "experts"))
    counts = mark_only_lora_trainable(lm)
    adapters = sum(v.numel() for v in lora_state_dict(lm).values())
    assert counts.trainable == adapters and counts.frozen > 5 * adapters
    _randomise_adapters(lm)
    x = torch.randint(0, 40, (2, 8))
    lm(x, x).loss.backward()
    for name, p in lm.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    routers = mark_only_lora_trainable(lm, train_also=("gate.",)).trainable
    assert routers == adapters + lm.layers[1].ffn.gate.proj.weight.numel()


def test_adapter_file_rebuilds_the_adapted_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    lm = _moe_lm()
    base_state = {k: v.clone() for k, v in lm.state_dict().items()}
    config = LoRAConfig(rank=3, alpha=3.0, targets=("q_proj", "o_proj", "experts"))
    config.apply(lm)
    assert adapter_config(lm) == LoRAConfig(
        rank=3, alpha=3.0, targets=("experts", "o_proj", "q_proj")
    )
    _randomise_adapters(lm)
    x = torch.randint(0, 40, (2, 8))
    adapted = lm(x).logits
    save_adapters(lm, tmp_path / "a.pt", config=config)
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all("lora_" in k for k in blob["state"])  # adapters only, no base weights
    fresh = _moe_lm()
    fresh.load_state_dict(base_state)
    assert load_adapters(fresh, tmp_path / "a.pt") == config
    torch.testing.assert_close(fresh(x).logits, adapted, atol=0.0, rtol=0.0)


def test_bad_targets_are_refused(tmp_path: Path) -> None:
    lm = _moe_lm()
    with pytest.raises(ValueError, match="match no module"):
        add_lora(lm, rank=2, alpha=2.0, targets=("nope",))
    with pytest.raises(ValueError, match=r"nn\.Linear and SwiGLUExperts"):
        add_lora(lm, rank=2, alpha=2.0, targets=("attn",))
    add_lora(lm, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already has"):
        add_lora(lm, rank=2, alpha=2.0)
    with pytest.raises(FileNotFoundError):
        load_adapters(lm, tmp_path / "missing.pt")


TINY_RUN = [
    "data.block_size=32",
    "data.batch_size=8",
    "data.steps_per_epoch=15",
    "trainer.max_steps=15",
    "trainer.enable_progress_bar=false",
    "generate.max_new_tokens=5",
]


@pytest.mark.slow
def test_lm_lora_experiment_trains_adapters_only(tmp_path: Path, shakespeare_path: Path) -> None:
    from mtl.training.build import load_module
    from mtl.training.config import compose_config
    from mtl.training.train import train

    base_run = [
        "experiment=lm_mixtral",
        "data.tokenizer=byte",
        "model.n_layers=1",
        "model.moe.num_experts=4",
        "model.moe.experts.d_hidden=32",
        f"output_dir={tmp_path / 'base'}",
        *TINY_RUN,
    ]
    base_ckpt = train(compose_config("train", base_run))["last_ckpt"]
    res = train(
        compose_config(
            "train",
            [
                "experiment=lm_lora",
                f"model.checkpoint={base_ckpt}",
                "model.rank=4",
                f"data.path={shakespeare_path}",
                f"output_dir={tmp_path / 'lora'}",
                *TINY_RUN,
            ],
        )
    )
    base = load_module(base_ckpt).net
    tuned = load_module(res["last_ckpt"]).net  # rebuilt from the base checkpoint + its config
    assert has_lora(tuned)
    tuned_state = tuned.state_dict()
    for name, value in base.state_dict().items():
        torch.testing.assert_close(tuned_state[name], value, atol=0.0, rtol=0.0)  # frozen
    assert any(v.abs().sum() > 0 for k, v in tuned_state.items() if "lora_B" in k)  # trained
    # the base plus the adapter file is the fine-tuned model
    load_adapters(base, tmp_path / "lora" / "adapters.pt")
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(base(x).logits, tuned(x).logits, atol=0.0, rtol=0.0)
