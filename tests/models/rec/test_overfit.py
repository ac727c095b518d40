"""Every model must be able to fit one small batch of learnable labels."""

import pytest
import torch
from torch import nn

from mtl.models.rec import ESMM, PLE, HoME, MMoE, OMoE, SharedBottom

from .helpers import TASKS, esmm_batch, fit, synthetic_batch, task_loss

MODELS: dict[str, type[nn.Module]] = {
    "shared_bottom": SharedBottom,
    "omoe": OMoE,
    "mmoe": MMoE,
    "ple": PLE,
    "home": HoME,
    "esmm": ESMM,
}
SMALL = {
    "shared_bottom": {"bottom_hidden": [32, 32], "tower_hidden": [16]},
    "omoe": {"num_experts": 4, "expert_hidden": [32], "tower_hidden": [16]},
    "mmoe": {"num_experts": 4, "expert_hidden": [32], "tower_hidden": [16]},
    "ple": {
        "num_levels": 2,
        "num_shared_experts": 2,
        "num_task_experts": 1,
        "expert_hidden": [32],
        "tower_hidden": [16],
    },
    "home": {
        "task_groups": {"watch": ["click"], "inter": ["like", "comment"]},
        "num_shared_experts": 2,
        "num_group_experts": 2,
        "num_task_experts": 1,
        "expert_hidden": [32],
        "lora_rank": 8,
        "tower_hidden": [16],
    },
    "esmm": {"tower_hidden": [32, 16], "cvr_task": "cvr"},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_overfits_one_batch(name: str) -> None:
    torch.manual_seed(0)
    x, labels = esmm_batch() if name == "esmm" else synthetic_batch()
    tasks = ["ctr", "ctcvr"] if name == "esmm" else TASKS
    model = MODELS[name](d_in=x.shape[1], tasks=tasks, dropout=0.0, **SMALL[name])
    with torch.no_grad():
        initial = float(task_loss(model(x), labels))
    final = fit(model, x, labels, steps=100, lr=1e-2)
    assert initial > 0.5  # chance level is ln 2 = 0.69 (ESMM's ctcvr is rarer)
    assert final < 0.02, f"{name} did not fit the batch: loss {initial:.3f} -> {final:.3f}"
    model.eval()  # predictions in eval mode (running batch-norm statistics) are right too
    with torch.no_grad():
        probs = model(x).probabilities()
    for t, y in labels.items():
        acc = ((probs[t] > 0.5).float() == y).float().mean().item()
        assert acc >= 0.95, f"{name}/{t}: eval accuracy {acc:.2f}"
