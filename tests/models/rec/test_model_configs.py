"""Every ranking model config (conf/model/*.yaml) builds from its _target_ and runs; model checks."""

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate

from mtl.models.rec import (
    ESMM,
    PLE,
    HoME,
    MMoE,
    MultiTaskOutput,
    OMoE,
    SharedBottom,
    TaskRoutedMoE,
)
from mtl.training.gate_config import model_config

CONF = Path(__file__).resolve().parents[3] / "conf" / "model"
REC_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml") if not p.stem.startswith("lm_"))
MODELS = [ESMM, HoME, MMoE, OMoE, PLE, SharedBottom, TaskRoutedMoE]


def test_every_model_class_has_a_config() -> None:
    targets = {model_config(name)["_target_"] for name in REC_CONFIGS}
    assert {get_class(t) for t in targets} == set(MODELS)


@pytest.mark.parametrize("name", REC_CONFIGS)
def test_every_yaml_config_builds_and_runs(name: str) -> None:
    cfg = model_config(name)
    tasks = ["ctr", "ctcvr"] if name == "esmm" else ["click", "like"]
    torch.manual_seed(0)
    model = instantiate(cfg, _convert_="all", d_in=24, tasks=tasks).eval()
    x = torch.randn(5, 24)
    out = model(x)
    assert isinstance(out, MultiTaskOutput)
    assert set(out.logits) | set(out.probs) == set(tasks)
    assert not set(out.logits) & set(out.probs)
    assert all(v.shape == (5,) for v in [*out.logits.values(), *out.probs.values()])
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    # rows are independent in eval mode: a row's output does not depend on the others
    first = model(x[:1])
    for task, value in out.probabilities().items():
        torch.testing.assert_close(first.probabilities()[task], value[:1])


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_empty_or_repeated_tasks_are_rejected(cls: type) -> None:
    with pytest.raises(ValueError, match="at least one task"):
        cls(d_in=4, tasks=[])
    with pytest.raises(ValueError, match=r"repeated: \['ctr'\]"):
        cls(d_in=4, tasks=["ctr", "ctr"])


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
    with pytest.raises(ValueError, match=r"unknown aux_loss_weights \['balance'\]"):
        MMoE(d_in=4, tasks=["click"], aux_loss_weights={"balance": 0.1})
