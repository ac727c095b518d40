"""Any gate in any model from config: the conf/gate group under model.gate / model.moe.gate."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from mtl.cli import main
from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec
from mtl.models.rec import PLE, HoME, MMoE, OMoE
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.ranker import Ranker
from mtl.moe import DenseSoftmaxGate, ExpertChoiceGate, NoisyTopKGate, TopKGate, TopPGate
from mtl.moe.multi_gate import MaskedGate, make_gate
from mtl.training.build import build
from mtl.training.config import ConfigError, compose_config
from mtl.training.gate_config import gate_name

REC = ["mmoe", "omoe", "ple", "home"]
SPARSE = {"top_k": TopKGate, "noisy_top_k": NoisyTopKGate, "top_p": TopPGate}
TASKS = ["click", "like"]
SMALL = ["model.expert_hidden=[16]", "model.tower_hidden=[8]"]
FAST_RUN = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=100",
    "data.source_kwargs.n_items=50",
    "data.batch_size=256",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


def _model(overrides: list[str], d_in: int = 12) -> torch.nn.Module:
    """The rec model `mtl train <overrides>` builds (without the data)."""
    cfg = compose_config("train", overrides)
    return build(cfg.model, what="model", d_in=d_in, tasks=TASKS)


def _routed(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every routing gate of a rec model's mixtures (masked gates unwrapped)."""
    from mtl.moe.multi_gate import MultiGateMixture

    gates = [
        g for m in model.modules() if isinstance(m, MultiGateMixture) for g in m.gates.values()
    ]
    return [g.gate if isinstance(g, MaskedGate) else g for g in gates]


@pytest.mark.parametrize(
    ("name", "direct"),
    [
        ("mmoe", lambda: MMoE(d_in=12, tasks=TASKS, num_experts=8, expert_hidden=[256, 128],
                              tower_hidden=[64], dropout=0.1)),
        ("omoe", lambda: OMoE(d_in=12, tasks=TASKS, num_experts=8, expert_hidden=[256, 128],
                              tower_hidden=[64], dropout=0.1)),
        ("ple", lambda: PLE(d_in=12, tasks=TASKS, dropout=0.1)),
        ("home", lambda: HoME(d_in=12, tasks=TASKS, dropout=0.1)),
    ],
)  # fmt: skip
def test_default_config_builds_the_same_net_as_before(name: str, direct) -> None:
    torch.manual_seed(0)
    from_config = _model([f"model={name}"]).eval()
    torch.manual_seed(0)
    reference = direct().eval()
    got, want = from_config.state_dict(), reference.state_dict()
    assert [(k, v.shape) for k, v in got.items()] == [(k, v.shape) for k, v in want.items()]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    x = torch.randn(6, 12)
    for task in TASKS:
        torch.testing.assert_close(from_config(x).logits[task], reference(x).logits[task])
    assert {type(g) for g in _routed(from_config)} == {DenseSoftmaxGate}


@pytest.mark.parametrize("gate", sorted(SPARSE))
@pytest.mark.parametrize("name", REC)
def test_every_rec_model_trains_with_a_sparse_gate(name: str, gate: str) -> None:
    model = _model([f"model={name}", f"model.gate={gate}", *SMALL]).train()
    gates = _routed(model)
    assert gates and all(isinstance(g, SPARSE[gate]) for g in gates)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 2, (64, 2)).float()
    losses = []
    for _ in range(3):
        out = model(x)
        loss = sum(
            torch.nn.functional.binary_cross_entropy_with_logits(out.logits[t], y[:, i])
            for i, t in enumerate(TASKS)
        )
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # experts a gate may not use get weight exactly 0 (PLE task gates, HoME hierarchy)
    if name in ("ple", "home"):
        w = model.eval()(x).gate_weights["click"]
        kinds = model.expert_kinds
        banned = [e for e, k in enumerate(kinds) if k.startswith("task:") and k != "task:click"]
        assert banned and w[:, banned].abs().max().item() == 0.0


def test_gate_parameters_override_from_the_command_line() -> None:
    model = _model(["model=mmoe", "model.gate=top_k", "model.gate.k=3", *SMALL])
    assert {g.k for g in _routed(model)} == {3}
    cfg = compose_config("train", ["model=mmoe", "model.gate=top_k"])
    assert cfg.name == "mmoe-top_k"
    assert compose_config("train", ["model=mmoe"]).name == "mmoe"


def test_masked_gate_keeps_to_its_experts_and_refuses_what_cannot_be_masked() -> None:
    gate = make_gate(TopKGate, d_model=8, num_experts=6, expert_mask=[1, 4], k=2)
    assert isinstance(gate, MaskedGate)
    r = gate(torch.randn(32, 8))
    assert set(r.experts_TK.flatten().tolist()) == {1, 4}
    with pytest.raises(ValueError, match="k=3 experts but may use only 2"):
        make_gate(TopKGate, d_model=8, num_experts=6, expert_mask=[1, 4], k=3)
    with pytest.raises(ValueError, match="ExpertChoiceGate cannot do"):
        make_gate(ExpertChoiceGate, d_model=8, num_experts=6, expert_mask=[1, 4])
    with pytest.raises(ValueError, match="TopKGate takes no logit_norm"):
        MMoE(d_in=4, tasks=TASKS, gate=partial(TopKGate, k=2), gate_norm=True)


def test_ranker_takes_the_plain_path_when_gates_do_not_fold() -> None:
    spec = FeatureSpec(
        categorical=[CategoricalFeature("item", 10, 4)],
        numeric=[],
        tasks=[TaskSpec("click", "binary")],
    )
    cat = torch.randint(0, 10, (32, 1))  # a batch large enough to fold the table
    for gate, folds in ((DenseSoftmaxGate, True), (TopKGate, False)):
        factory = gate if gate is DenseSoftmaxGate else partial(TopKGate, k=2)
        model = MMoE(d_in=4, tasks=["click"], num_experts=4, expert_hidden=[8], gate=factory)
        ranker = Ranker(embedding=FeatureEmbedding(spec=spec), model=model)
        assert ranker.folds(32) is folds
        assert ranker(cat, torch.zeros(32, 0)).logits["click"].shape == (32,)
    jitter = MMoE(d_in=4, tasks=["click"], expert_hidden=[8],
                  gate=partial(DenseSoftmaxGate, input_jitter=0.01))  # fmt: skip
    assert not Ranker(embedding=FeatureEmbedding(spec=spec), model=jitter).folds(32)


def test_cli_run_records_the_gate_in_name_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "model=ple", "model.gate=top_k", *SMALL, *FAST_RUN, f"output_dir={out}"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "ple" and metrics["gate"] == "top_k"
    assert "name: ple-top_k" in (out / "config.yaml").read_text()


def test_lm_preset_takes_another_gate() -> None:
    cfg = compose_config("train", ["experiment=lm_mixtral", "model.moe.gate=dense_softmax"])
    assert cfg.name == "lm_mixtral-dense_softmax"
    node = {**cfg.model, "vocab_size": 30, "max_seq_len": 16, "n_layers": 1}
    net = build(node, what="model")
    assert gate_name(net) == "dense_softmax"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    idx = torch.randint(0, 30, (2, 16))
    out = net(idx)
    logits = out.logits if hasattr(out, "logits") else out[0]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), idx.reshape(-1))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    default = compose_config("train", ["experiment=lm_olmoe"])
    assert default.name == "lm_olmoe" and default.model.moe.gate.k == 8


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=mmoe", "model.gate=bogus"], "error: unknown gate 'bogus' for model.gate"),
        (["model=ple", "model.gate=expert_choice"], "error: could not build model"),
        (["model=mmoe", "model.gate.k=2"], "error: could not compose config"),
        (["model=shared_bottom", "model.gate=top_k"], "error: could not compose config"),
    ],
)
def test_a_misfit_gate_is_one_error_line(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *args, *FAST_RUN, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_gate_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"available gate configs: .*top_k"):
        compose_config("train", ["model.gate=topk"])
