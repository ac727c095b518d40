"""Mixture of Tokens: the formulas against a naive loop, causality, group size 1, gradients, temperature."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl.models.lm import TransformerLM
from mtl.models.lm.blocks import SwiGLU
from mtl.moe import SwiGLUExperts
from mtl.moe.mixture_of_tokens import (
    MixtureOfTokens,
    MixtureOfTokensFFN,
    TemperatureSchedule,
    set_temperature,
)


def _mot(
    group_size: int, *, E: int = 3, D: int = 8, H: int = 12, tau: float = 1.0
) -> MixtureOfTokens:
    torch.manual_seed(0)
    mot = MixtureOfTokens(
        d_model=D,
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H),
        group_size=group_size,
        temperature=tau,
    )
    with torch.no_grad():
        mot.controller.weight.normal_(0.0, 1.0)  # visible mixing
    return mot


def _naive(mot: MixtureOfTokens, x_BTD: torch.Tensor) -> torch.Tensor:
    """Group by group, position by position, expert by expert."""
    B, T, _ = x_BTD.shape
    out = torch.zeros_like(x_BTD)
    tau = float(mot.temperature)
    for start in range(0, B, mot.group_size):
        members = list(range(start, min(start + mot.group_size, B)))
        for t in range(T):
            xs = x_BTD[members, t]  # (g, D)
            scores = xs @ mot.controller.weight.T  # (g, E)
            for e in range(mot.num_experts):
                w = torch.softmax(scores[:, e] / tau, dim=0)  # over the group
                mixed = (w[:, None] * xs).sum(0)
                ex = mot.experts
                y = (F.silu(mixed @ ex.w_gate[e]) * (mixed @ ex.w_up[e])) @ ex.w_down[e]
                for i, b in enumerate(members):
                    out[b, t] += w[i] * y
    return out


@pytest.mark.parametrize("group_size,batch", [(2, 4), (3, 5), (4, 2)])
def test_matches_the_formulas_including_a_partial_group(group_size: int, batch: int) -> None:
    mot = _mot(group_size, tau=0.7)
    x = torch.randn(batch, 6, 8)
    torch.testing.assert_close(mot(x), _naive(mot, x), atol=1e-5, rtol=1e-5)


def test_causal_no_output_depends_on_a_later_position() -> None:
    mot = _mot(4)
    x = torch.randn(8, 10, 8)
    y = mot(x)
    for t in (0, 4, 8):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])  # every example's future
        y2 = mot(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=0.0, rtol=0.0)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3
    # but a token does depend on the other examples of its group at its own position
    x3 = x.clone()
    x3[1, 3] += 1.0
    y3 = mot(x3)
    assert (y3[0, 3] - y[0, 3]).abs().max() > 1e-5 and torch.equal(y3[4:], y[4:])


def test_group_size_one_is_the_dense_ffn_of_all_experts_concatenated() -> None:
    mot = _mot(1, E=3, D=8, H=12, tau=0.3)
    ex = mot.experts
    dense = SwiGLU(d_model=8, d_hidden=3 * 12)
    with torch.no_grad():
        # hidden unit e*H + h of the dense FFN is unit h of expert e
        dense.gate_proj.weight.copy_(ex.w_gate.permute(0, 2, 1).reshape(36, 8))
        dense.up_proj.weight.copy_(ex.w_up.permute(0, 2, 1).reshape(36, 8))
        dense.down_proj.weight.copy_(ex.w_down.reshape(36, 8).T)
    x = torch.randn(5, 7, 8)
    torch.testing.assert_close(mot(x), dense(x), atol=1e-6, rtol=1e-6)


def test_gradients_reach_every_expert_and_the_controller() -> None:
    mot = _mot(4, E=4)
    mot(torch.randn(8, 5, 8)).pow(2).sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(mot.experts, name).grad
        assert grad is not None and (grad.flatten(1).abs().sum(1) > 0).all(), name
    assert mot.controller.weight.grad.abs().sum(1).gt(0).all()


def test_lower_temperature_makes_the_weights_one_hot() -> None:
    mot = _mot(8, E=4)
    x = torch.randn(8, 6, 8)
    sched = TemperatureSchedule(start=1.0, end=1e-3, steps=10)
    peaks = []
    for step in (0, 5, 10):
        assert set_temperature(mot, sched.at(step)) == 1
        peaks.append(mot.mixing_weights(x).max(dim=1).values.mean().item())
    assert peaks[0] < peaks[1] < peaks[2] and peaks[2] > 0.999
    # at a tiny temperature each expert takes its top-scoring token of the group
    w = mot.mixing_weights(x)
    top = (x.view(1, 8, 6, 8) @ mot.controller.weight.T).argmax(dim=1)  # (1, T, E)
    torch.testing.assert_close(w.argmax(dim=1), top)
    assert TemperatureSchedule(start=2.0, end=1.0, steps=4, kind="linear").at(2) == 1.5


def test_lm_with_mot_ffn_learns_a_few_steps() -> None:
    torch.manual_seed(0)
    make = MixtureOfTokensFFN(
        num_experts=4, group_size=4, experts=partial(SwiGLUExperts, d_hidden=16)
    )
    lm = TransformerLM(vocab_size=12, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=make)
    assert all(isinstance(b.ffn, MixtureOfTokens) for b in lm.layers)
    data = torch.arange(12).repeat(8, 3)[:, :17]  # a pattern to learn
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = lm(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    lm(torch.randint(0, 12, (1, 5)))  # generation-sized batch: one group of one


def test_bad_arguments() -> None:
    bank = SwiGLUExperts(num_experts=2, d_model=4, d_hidden=4)
    with pytest.raises(ValueError, match="group_size"):
        MixtureOfTokens(d_model=4, experts=bank, group_size=0)
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        MixtureOfTokens(d_model=4, experts=bank, group_size=2)(torch.randn(3, 4))


def test_the_callback_applies_the_schedule_before_each_step() -> None:
    from types import SimpleNamespace

    from torch import nn

    from mtl.training.callbacks import TokenMixingTemperature

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mot = _mot(2)
            self.logged: dict[str, float] = {}

        def log(self, key: str, value: float, **_: object) -> None:
            self.logged[key] = value

    module = Module()
    callback = TokenMixingTemperature(start=1.0, end=0.01, steps=10)
    for step, expected in ((0, 1.0), (5, 0.1), (20, 0.01)):
        trainer = SimpleNamespace(global_step=step)
        callback.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
        assert float(module.mot.temperature) == pytest.approx(expected, rel=1e-5)
        assert module.logged["train/mot_temperature"] == pytest.approx(expected)


@pytest.mark.slow
def test_lm_mot_experiment_runs_with_transition_tuning(tmp_path: Path) -> None:
    from mtl.training.build import load_module
    from mtl.training.config import compose_config
    from mtl.training.train import train

    res = train(
        compose_config(
            "train",
            [
                "experiment=lm_mot",
                "model.n_layers=1",
                "model.moe.experts.d_hidden=32",
                "model.moe.group_size=4",
                "data.block_size=32",
                "data.batch_size=8",
                "data.steps_per_epoch=20",
                "trainer.max_steps=20",
                "trainer.enable_progress_bar=false",
                "generate.max_new_tokens=5",
                f"output_dir={tmp_path}",
            ],
        )
    )
    net = load_module(res["last_ckpt"]).net
    assert res["global_step"] == 20 and res["val_loss"] < math.log(net.vocab_size) - 0.5
    (layer,) = [m for m in net.modules() if isinstance(m, MixtureOfTokens)]
    # the temperature is saved with the model: the schedule's value at the last step
    assert float(layer.temperature) == pytest.approx(TemperatureSchedule(end=0.05, steps=20).at(19))
