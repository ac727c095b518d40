"""RecModule losses: BCE on logits, BCE on probabilities (ESMM), MSE; weights; errors."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mtl.data.features import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.data.tabular import RecBatch
from mtl.models.rec import ESMM, PLE, MMoE, OMoE, Ranker
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.training.config import ConfigError
from mtl.training.metrics import RegressionTaskMetrics
from mtl.training.rec_module import RecModule
from mtl.training.train import resolve_monitor


def _spec(tasks: list[TaskSpec]) -> FeatureSpec:
    return FeatureSpec(
        categorical=[CategoricalFeature("item", 20, 4), CategoricalFeature("user", 30, 4)],
        numeric=[NumericFeature("price", 0.0, 1.0)],
        tasks=tasks,
        user_column="user",
    )


def _net(spec: FeatureSpec, model_cls: type = MMoE, fold: bool = True, **kw: Any) -> Ranker:
    embedding = FeatureEmbedding(spec=spec, fold=fold)
    model = model_cls(d_in=embedding.output_dim, tasks=spec.task_names, **kw)
    return Ranker(embedding=embedding, model=model)


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
    net = _net(spec, num_experts=2, expert_hidden=[8], aux_loss_weights={"importance": 0.5})
    module = RecModule(net=net, task_weights={"like": 0.25})
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
    assert module.net.embedding.tables[0].weight.grad is not None


def test_probability_outputs_use_bce_on_clamped_probs() -> None:
    spec = _spec([TaskSpec("ctr", "binary"), TaskSpec("ctcvr", "binary")])
    module = RecModule(net=_net(spec, ESMM, tower_hidden=[8]))
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
    module = RecModule(net=_net(spec, num_experts=2, expert_hidden=[8]))
    batch = _batch(2, seed=2)
    batch.labels = torch.randn(16, 2) * 3
    out = module(batch)
    _, parts = module.compute_loss(out, batch.labels)
    torch.testing.assert_close(parts["y2"], F.mse_loss(out.logits["y2"], batch.labels[:, 1]))
    cfg = OmegaConf.create({"monitor": "auto", "monitor_mode": "auto"})
    assert resolve_monitor(cfg, module) == ("val/loss", "min")
    assert isinstance(module.eval_metrics["y1"], RegressionTaskMetrics)


def test_bad_task_weights_and_monitor_name_the_problem() -> None:
    spec = _spec([TaskSpec("click", "binary")])
    with pytest.raises(ValueError, match="unknown tasks"):
        RecModule(net=_net(spec, expert_hidden=[8]), task_weights={"clicks": 1.0})
    module = RecModule(net=_net(spec, expert_hidden=[8]))
    cfg = OmegaConf.create({"monitor": "val/auc_maen", "monitor_mode": "auto"})
    with pytest.raises(ConfigError, match=r"val/auc_maen.*val/auc_mean"):
        resolve_monitor(cfg, module)
    cfg = OmegaConf.create({"monitor": "val/auc/click", "monitor_mode": "auto"})
    assert resolve_monitor(cfg, module) == ("val/auc/click", "max")


def test_optimizer_and_schedule_come_from_the_given_factories() -> None:
    spec = _spec([TaskSpec("click", "binary")])
    module = RecModule(
        net=_net(spec, expert_hidden=[8]),
        optimizer=partial(torch.optim.SGD, lr=0.5),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3),
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["optimizer"].param_groups[0]["lr"] == 0.5
    assert {id(p) for p in config["optimizer"].param_groups[0]["params"]} == {
        id(p) for p in module.parameters()
    }
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_hparams_rebuild_the_same_module() -> None:
    spec = _spec([TaskSpec("click", "binary"), TaskSpec("like", "binary")])
    module = RecModule(net=_net(spec, num_experts=2, expert_hidden=[8]), seed=5)
    assert "net" not in module.hparams and module.hparams["seed"] == 5
    restored = RecModule(net=_net(spec, num_experts=2, expert_hidden=[8]), **module.hparams)
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
    model_cls = {"mmoe": MMoE, "omoe": OMoE, "ple": PLE}[model]
    results = []
    for fold in (True, False):
        torch.manual_seed(0)
        net = _net(spec, model_cls, fold=fold, **sizes, expert_hidden=[8, 4], expert_norm=True)
        module = RecModule(net=net, diagnostics=False)
        assert module.net.folds(batch.batch_size) == fold
        loss, _ = module.compute_loss(module(batch), batch.labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p)
    for a, b in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
