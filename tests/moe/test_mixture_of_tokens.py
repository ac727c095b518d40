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
        members = list(range(start, start + mot.group_size))
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


@pytest.mark.parametrize("group_size,batch", [(2, 4), (3, 6), (4, 4)])
def test_matches_the_formulas(group_size: int, batch: int) -> None:
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


def test_a_token_alone_gets_another_function_than_in_a_full_group() -> None:
    """Why a smaller group is refused: alone, every weight is 1 and a token gets the sum of
    the experts' outputs; in a group each expert's weights sum to 1 over the group."""
    mot = _mot(8, E=4)
    x = torch.randn(8, 5, 8)
    alone = _mot(1, E=4)  # the same weights, groups of one
    in_group, by_itself = mot(x)[0], alone(x[:1])[0]
    ex = mot.experts
    summed = sum(
        (F.silu(x[0] @ ex.w_gate[e]) * (x[0] @ ex.w_up[e])) @ ex.w_down[e] for e in range(4)
    )
    torch.testing.assert_close(by_itself, summed, atol=1e-5, rtol=1e-5)
    assert (in_group - by_itself).norm() > 0.5 * by_itself.norm()
    torch.testing.assert_close(mot.mixing_weights(x).sum(dim=1), torch.ones(1, 5, 4))


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_a_batch_that_is_not_whole_groups_is_refused(batch: int) -> None:
    with pytest.raises(ValueError, match="group_size=8 examples, got a batch of"):
        _mot(8)(torch.randn(batch, 3, 8))


def test_the_config_check_refuses_a_batch_size_off_the_group_size() -> None:
    from mtl.training.config import ConfigError, compose_config
    from mtl.training.config_checks import check_train_config

    check_train_config(compose_config("train", ["experiment=lm_mot", "data.batch_size=16"]))
    for override, key in (
        ("data.batch_size=12", "data.batch_size=12"),
        ("data.val_batch_size=4", "data.val_batch_size=4"),
        ("model.moe.group_size=3", "data.batch_size=32"),
    ):
        cfg = compose_config("train", ["experiment=lm_mot", override])
        with pytest.raises(ConfigError, match=f"{key} is not a multiple of model.moe.group_size"):
            check_train_config(cfg)
    # the model without the experiment: the val loader must be told to form whole groups
    cfg = compose_config("train", ["experiment=lm_dense", "model=lm_mot"])
    with pytest.raises(
        ConfigError, match=r"data.batch_multiple=None is not a multiple of model.moe.group_size=8"
    ):
        check_train_config(cfg)


def test_validation_batches_are_whole_groups_on_every_process() -> None:
    from mtl.data.text import TextDataModule

    dm = TextDataModule(path=None, block_size=64, batch_size=8, batch_multiple=8)
    n_blocks = (len(dm.tokens("val")) - 1) // 64
    assert n_blocks % 16  # the embedded corpus leaves a partial group to drop
    batches = [len(b.inputs) for b in dm.val_dataloader()]
    assert all(b % 8 == 0 for b in batches) and sum(batches) == n_blocks // 8 * 8
    # two processes: whole groups on each, the same number of batches, no block twice
    from types import SimpleNamespace

    firsts = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # type: ignore[assignment]
        loader = list(dm.val_dataloader())
        assert all(len(b.inputs) % 8 == 0 for b in loader)
        firsts.append({tuple(row.tolist()) for b in loader for row in b.inputs})
    dm.trainer = None
    assert not firsts[0] & firsts[1] and len(firsts[0]) == len(firsts[1]) == n_blocks // 16 * 8
    with pytest.raises(ValueError, match="multiples of batch_multiple=8"):
        TextDataModule(path=None, batch_size=8, val_batch_size=12, batch_multiple=8)


def test_gradients_reach_every_expert_and_the_controller() -> None:
    """Every expert's and the controller's gradients equal the naive loop's."""
    mot = _mot(4, E=4)
    x = torch.randn(8, 5, 8)
    params = [mot.experts.w_gate, mot.experts.w_up, mot.experts.w_down, mot.controller.weight]
    got = torch.autograd.grad(mot(x).pow(2).sum(), params)
    want = torch.autograd.grad(_naive(mot, x).pow(2).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert (w.flatten(1).abs().sum(1) > 1e-4).all()  # every expert, every controller row
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


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


def test_generation_samples_a_full_group_of_copies_of_the_prompt() -> None:
    from mtl.models.lm.generate import generate

    torch.manual_seed(0)
    make = MixtureOfTokensFFN(
        num_experts=4, group_size=4, experts=partial(SwiGLUExperts, d_hidden=16)
    )
    lm = TransformerLM(vocab_size=12, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=make)
    prompt = torch.randint(0, 12, (1, 5))
    out = generate(lm, prompt, max_new_tokens=6, temperature=0)
    # greedy: the group is 4 identical rows, every step; the naive loop runs exactly that
    idx = prompt.repeat(4, 1)
    for _ in range(6):
        idx = torch.cat([idx, lm(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (1, 11) and torch.equal(out, idx[:1])
    # three prompts: the last is repeated to fill the group, and the rows come back in order
    prompts = torch.randint(0, 12, (3, 5))
    out3 = generate(lm, prompts, max_new_tokens=4, temperature=0)
    idx = torch.cat([prompts, prompts[-1:]])
    for _ in range(4):
        idx = torch.cat([idx, lm(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out3, idx[:3])
    with pytest.raises(ValueError, match="group_size=4"):
        lm(prompt)  # the model itself never runs a group of one


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
