"""RecModule losses: BCE on logits, BCE on probabilities (ESMM), MSE; weights; errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mtl.data.features import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.data.tabular import RecBatch
from mtl.training.metrics import RegressionTaskMetrics
from mtl.training.rec_module import RecModule
from mtl.training.rec_runner import resolve_monitor


def _spec(tasks: list[TaskSpec]) -> FeatureSpec:
    return FeatureSpec(
        categorical=[CategoricalFeature("item", 20, 4), CategoricalFeature("user", 30, 4)],
        numeric=[NumericFeature("price", 0.0, 1.0)],
        tasks=tasks,
        user_column="user",
    )


def _batch(n_tasks: int, n: int = 16, seed: int = 0) -> RecBatch:
    gen = torch.Generator().manual_seed(seed)
    return RecBatch(
        cat=torch.randint(0, 21, (n, 2), generator=gen),
        num=torch.randn(n, 1, generator=gen),
        labels=(torch.rand(n, n_tasks, generator=gen) < 0.5).float(),
        user=torch.randint(0, 4, (n,), generator=gen),
    )


def test_binary_losses_are_weighted_bce_with_logits_plus_aux() -> None:
    spec = _spec([TaskSpec("click", "binary", weight=2.0), TaskSpec("like", "binary")])
    module = RecModule(
        spec=spec,
        model={
            "name": "mmoe",
            "num_experts": 2,
            "expert_hidden": [8],
            "aux_loss_weights": {"importance": 0.5},
        },
        task_weights={"like": 0.25},
    )
    batch = _batch(2)
    out = module(batch)
    total, parts = module.compute_loss(out, batch.labels)
    for j, task in enumerate(["click", "like"]):
        want = F.binary_cross_entropy_with_logits(out.logits[task], batch.labels[:, j])
        torch.testing.assert_close(parts[task], want)
    assert module.loss_weights == {"click": 2.0, "like": 0.25}
    torch.testing.assert_close(total, 2.0 * parts["click"] + 0.25 * parts["like"] + out.aux_loss)
    assert out.aux_loss.item() > 0  # the aux loss really is part of the total
    total.backward()
    assert module.embedding.tables[0].weight.grad is not None


def test_probability_outputs_use_bce_on_clamped_probs() -> None:
    spec = _spec([TaskSpec("ctr", "binary"), TaskSpec("ctcvr", "binary")])
    module = RecModule(spec=spec, model={"name": "esmm", "tower_hidden": [8]})
    batch = _batch(2, seed=1)
    out = module(batch)
    assert "ctcvr" in out.probs
    _, parts = module.compute_loss(out, batch.labels)
    want = F.binary_cross_entropy(out.probs["ctcvr"].clamp(1e-7, 1 - 1e-7), batch.labels[:, 1])
    torch.testing.assert_close(parts["ctcvr"], want)
    preds = module.predictions(out)
    torch.testing.assert_close(preds["ctr"], torch.sigmoid(out.logits["ctr"]))


def test_regression_tasks_use_mse_and_monitor_val_loss() -> None:
    spec = _spec([TaskSpec("y1", "regression"), TaskSpec("y2", "regression")])
    module = RecModule(spec=spec, model={"name": "mmoe", "num_experts": 2, "expert_hidden": [8]})
    batch = _batch(2, seed=2)
    batch.labels = torch.randn(16, 2) * 3
    out = module(batch)
    _, parts = module.compute_loss(out, batch.labels)
    torch.testing.assert_close(parts["y2"], F.mse_loss(out.logits["y2"], batch.labels[:, 1]))
    cfg = OmegaConf.create({"monitor": "auto", "monitor_mode": "auto"})
    assert resolve_monitor(cfg, module) == ("val/loss", "min")
    assert isinstance(module.eval_metrics["y1"], RegressionTaskMetrics)


def test_bad_config_errors_name_the_problem() -> None:
    spec = _spec([TaskSpec("click", "binary")])
    with pytest.raises(ValueError, match="unknown tasks"):
        RecModule(spec=spec, model={"name": "mmoe"}, task_weights={"clicks": 1.0})
    with pytest.raises(ValueError, match=r"optim\.name"):
        RecModule(spec=spec, model={"name": "mmoe"}, optim={"name": "sgdx"})
    with pytest.raises(ValueError, match="unknown model"):
        RecModule(spec=spec, model={"name": "mmoee"})


def test_hparams_rebuild_the_same_module() -> None:
    spec = _spec([TaskSpec("click", "binary"), TaskSpec("like", "binary")])
    module = RecModule(
        spec=spec, model={"name": "mmoe", "num_experts": 2, "expert_hidden": [8]}, seed=5
    )
    restored = RecModule(**module.hparams)
    restored.load_state_dict(module.state_dict())
    batch = _batch(2, seed=3)
    module.eval()
    restored.eval()
    torch.testing.assert_close(module(batch).logits["like"], restored(batch).logits["like"])
    assert restored.spec == spec and restored.num_params == module.num_params


@pytest.mark.parametrize("model", ["mmoe", "omoe", "ple"])
def test_folded_embedding_path_equals_plain_path(model: str) -> None:
    """MMoE/OMoE/PLE on the projected embedding tables: same loss and gradients as on the embeddings."""
    spec = _spec([TaskSpec("click", "binary"), TaskSpec("like", "binary")])
    batch = _batch(2, n=256)
    sizes = (
        {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 1}
        if model == "ple"
        else {"num_experts": 3}
    )
    cfg = {"name": model, **sizes, "expert_hidden": [8, 4], "expert_norm": True}
    results = []
    for fold in (True, False):
        torch.manual_seed(0)
        module = RecModule(spec=spec, model=cfg, embedding={"fold": fold}, diagnostics=False)
        assert any(module.embedding.folds(batch.batch_size)) == fold
        loss, _ = module.compute_loss(module(batch), batch.labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p)
    for a, b in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
