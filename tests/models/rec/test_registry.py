from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl.models.rec import (
    ESMM,
    MODELS,
    PLE,
    HoME,
    MMoE,
    MultiTaskOutput,
    OMoE,
    SharedBottom,
    build_model,
    build_model_from_config,
)

CONF = Path(__file__).resolve().parents[3] / "conf" / "model"


def test_registry_names_every_model() -> None:
    assert {
        "shared_bottom": SharedBottom,
        "omoe": OMoE,
        "mmoe": MMoE,
        "ple": PLE,
        "esmm": ESMM,
        "home": HoME,
    } == MODELS


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'mmeo'.*'home'.*'mmoe'"):
        build_model("mmeo", d_in=4, tasks=["click"])


def test_unknown_hyper_parameter_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown arguments \['num_expert'\]"):
        build_model("mmoe", d_in=4, tasks=["click"], num_expert=3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_empty_or_repeated_tasks_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="at least one task"):
        build_model(name, d_in=4, tasks=[])
    with pytest.raises(ValueError, match=r"repeated: \['ctr'\]"):
        build_model(name, d_in=4, tasks=["ctr", "ctr"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_yaml_config_builds_and_runs(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.name == name
    tasks = ["ctr", "ctcvr"] if name == "esmm" else ["click", "like"]
    model = build_model_from_config(cfg, d_in=24, tasks=tasks)
    assert isinstance(model, MODELS[name])
    model.eval()
    out = model(torch.randn(5, 24))
    assert isinstance(out, MultiTaskOutput)
    assert sorted(out.logits) + sorted(out.probs) != []
    assert set(out.logits) | set(out.probs) == set(tasks)
    assert not set(out.logits) & set(out.probs)
    assert all(v.shape == (5,) for v in [*out.logits.values(), *out.probs.values()])
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32


def test_config_without_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_model_from_config({"num_experts": 2}, d_in=4, tasks=["click"])


def test_output_defaults_and_probabilities() -> None:
    out = MultiTaskOutput(
        logits={"click": torch.tensor([0.0, 2.0])}, probs={"ctcvr": torch.tensor([0.25, 0.5])}
    )
    assert out.tasks == ["click", "ctcvr"]
    p = out.probabilities()
    torch.testing.assert_close(p["click"], torch.sigmoid(torch.tensor([0.0, 2.0])))
    assert p["ctcvr"].tolist() == [0.25, 0.5]
    assert out.aux_loss.item() == 0.0 and out.gate_weights == {} and out.expert_outputs is None


def test_unknown_aux_loss_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"unknown auxiliary losses \['balance'\]"):
        MMoE(d_in=4, tasks=["click"], aux_loss_weights={"balance": 0.1})
