"""step_logging: which steps log, epoch means on the device, and RecModule's training logs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torchmetrics import Metric

from mtl.data.spec import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.data.tabular import RecBatch
from mtl.models.rec import MMoE
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.ranker import Ranker
from mtl.training.rec_module import RecModule
from mtl.training.step_logging import EpochMeans, step_metrics_due


def _trainer(root: Path, **kw: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
    }
    return pl.Trainer(**{**settings, **kw})


# ------------------------------------------------------------------ EpochMeans
def test_epoch_means_are_batch_size_weighted_means() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(7, 3, generator=gen)  # (steps, names)
    weights = [16, 16, 3, 16, 1, 9, 16]
    means = EpochMeans()
    for step in range(7):
        means.update(
            {"a": values[step, 0], "b": values[step, 1], "c": values[step, 2]}, weights[step]
        )
    got = means.compute()
    w = torch.tensor(weights, dtype=torch.float64)
    for j, name in enumerate("abc"):
        want = (values[:, j].double() * w).sum() / w.sum()
        assert abs(float(got[name]) - float(want)) < 1e-6, name
    assert abs(float(got["a"]) - float(values[:, 0].mean())) > 1e-3  # the weights matter here


def test_epoch_means_reset_detach_and_errors() -> None:
    means = EpochMeans()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' warning
        assert means.compute() == {}
    x = torch.tensor(2.0, requires_grad=True)
    means.update({"loss": x * 3}, 4)
    (mean,) = means.compute().values()
    assert not mean.requires_grad and float(mean) == 6.0
    with pytest.raises(ValueError, match=r"\['other'\] after \['loss'\]"):
        means.update({"other": x}, 1)
    with pytest.raises(ValueError, match="'loss' has shape \\(2,\\)"):
        means.update({"loss": torch.ones(2)}, 1)
    means.reset()
    means.update({"other": torch.tensor(1.0)}, 1)
    assert list(means.compute()) == ["other"]


def test_epoch_means_is_a_metric_of_sums_that_follows_the_module() -> None:
    means = EpochMeans()
    assert isinstance(means, Metric)
    assert set(means.metric_state) == {"sums", "weight"}  # reduced across processes by sum
    holder = nn.Module()
    holder.means = means
    assert list(holder.state_dict()) == []  # nothing in checkpoints: the states are per epoch
    means.update({"loss": torch.tensor(4.0)}, 2)
    means.update({"loss": torch.tensor(1.0)}, 1)
    assert means.sums.tolist() == [9.0] and int(means.weight) == 3
    assert float(means.compute()["loss"]) == 3.0
    means.update({"loss": torch.tensor(0.0)}, 1)  # an update drops the cached result
    assert float(means.compute()["loss"]) == 2.25


# ---------------------------------------------------------- step_metrics_due
class _Probe(pl.LightningModule):
    """Records step_metrics_due in the three hooks of every training batch and logs
    the running batch count on every batch, so the logger's writes can be compared."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.due: list[tuple[int, int, bool]] = []  # training_step
        self.due_start: list[bool] = []
        self.due_end: list[bool] = []
        self.batches = 0

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        self.due_start.append(step_metrics_due(self, batch_idx))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.due.append((self.current_epoch, batch_idx, step_metrics_due(self, batch_idx)))
        self.batches += 1
        self.log("seen", float(self.batches), on_step=True, on_epoch=False)
        return (self.w - batch).pow(2).mean()

    def on_train_batch_end(self, outputs: Any, batch: Tensor, batch_idx: int) -> None:
        self.due_end.append(step_metrics_due(self, batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.randn(n, 1), batch_size=1)


@pytest.mark.parametrize(("n", "accumulate"), [(10, 1), (7, 2)])
def test_due_batches_are_the_ones_the_logger_writes_in_every_hook(
    tmp_path: Path, n: int, accumulate: int
) -> None:
    """Against a real CSV logger: the step of every written row is the step of a due
    batch, every due batch but the epoch's last is written, in all three hooks."""
    epochs, every = 3, 3
    probe = _Probe()
    trainer = _trainer(
        tmp_path,
        max_epochs=epochs,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(tmp_path),
    )
    trainer.fit(probe, train_dataloaders=_loader(n))

    # Naive bookkeeping of Lightning's rule: a batch belongs to the optimizer step
    # counted before it; the epoch's last batch always steps.
    step_of: list[int] = []
    last: list[bool] = []
    stepping: list[bool] = []
    steps = 0
    for _ in range(epochs):
        for b in range(n):
            steps_here = (b + 1) % accumulate == 0 or b == n - 1
            step_of.append(steps)
            last.append(b == n - 1)
            stepping.append(steps_here)
            steps += int(steps_here)
    want = [(s + 1) % every == 0 or is_last for s, is_last in zip(step_of, last, strict=True)]
    assert [due for _, _, due in probe.due] == want
    assert probe.due_start == want and probe.due_end == want

    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    written = {int(r["step"]): float(r["seen"]) for r in rows if r.get("seen")}
    due_not_last = {
        s: i + 1  # the value logged by the step's stepping batch
        for i, (s, due, is_last, steps_here) in enumerate(
            zip(step_of, want, last, stepping, strict=True)
        )
        if due and not is_last and steps_here
    }
    assert written.keys() >= due_not_last.keys()
    assert set(written) <= {s for s, due in zip(step_of, want, strict=True) if due}
    for s, value in due_not_last.items():
        assert written[s] == value, s


def test_due_on_logger_steps_bar_refreshes_and_last_batch(tmp_path: Path) -> None:
    probe = _Probe()
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        log_every_n_steps=3,
        enable_progress_bar=True,
        callbacks=[TQDMProgressBar(refresh_rate=4)],
    )
    trainer.fit(probe, train_dataloaders=_loader(10))
    got = [(e, b) for e, b, due in probe.due if due]
    want = [
        (e, b)
        for e in range(2)
        for b in range(10)
        if (10 * e + b + 1) % 3 == 0 or (b + 1) % 4 == 0 or b == 9
    ]
    assert got == want
    assert len(probe.due) == 20 and len(got) < 20


def test_due_on_the_last_step_of_a_max_steps_run(tmp_path: Path) -> None:
    probe = _Probe()
    trainer = _trainer(tmp_path, max_steps=7, log_every_n_steps=5)
    trainer.fit(probe, train_dataloaders=_loader(50))
    assert [b for _, b, due in probe.due if due] == [4, 6]


def test_due_without_a_trainer() -> None:
    assert step_metrics_due(_Probe(), 0)


# ------------------------------------------------------------ RecModule logs
def _spec() -> FeatureSpec:
    return FeatureSpec(
        categorical=[CategoricalFeature("item", 20, 4), CategoricalFeature("user", 30, 4)],
        numeric=[NumericFeature("price", 0.0, 1.0)],
        tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")],
    )


class _Batches:
    """A fixed list of batches as one loader (a plain list would be many loaders)."""

    def __init__(self, batches: list[RecBatch]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _batches(sizes: list[int]) -> _Batches:
    gen = torch.Generator().manual_seed(1)
    return _Batches(
        [
            RecBatch(
                cat=torch.randint(0, 20, (n, 2), generator=gen),
                num=torch.randn(n, 1, generator=gen),
                labels=(torch.rand(n, 2, generator=gen) < 0.4).float(),
            )
            for n in sizes
        ]
    )


def test_rec_training_logs_match_per_step_lightning_logging(
    tmp_path: Path, count_log_calls: Any
) -> None:
    """Epoch means equal batch-size-weighted means of every step's losses; the step
    loss is written at exactly the steps Lightning's logger writes; few log calls."""
    torch.manual_seed(0)
    spec = _spec()
    embedding = FeatureEmbedding(spec=spec)
    mmoe = MMoE(
        d_in=embedding.output_dim,
        tasks=spec.task_names,
        num_experts=3,
        expert_hidden=[8],
        aux_loss_weights={"importance": 0.1},
    )
    module = RecModule(net=Ranker(embedding=embedding, model=mmoe), diagnostics=False)
    seen: list[tuple[int, float, dict[str, float], float, int]] = []
    compute_loss = module.compute_loss

    def recording(out: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = compute_loss(out, labels)
        seen.append(
            (
                module.current_epoch,
                float(total),
                {k: float(v) for k, v in parts.items()},
                float(out.aux_loss),
                labels.shape[0],
            )
        )
        return total, parts

    module.compute_loss = recording  # type: ignore[method-assign]
    calls = count_log_calls(module)
    sizes = [16, 16, 16, 5]  # a short last batch: the means must weigh by batch size
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=3, logger=CSVLogger(tmp_path))
    trainer.fit(module, train_dataloaders=_batches(sizes))
    assert len(seen) == 8

    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1]
    for epoch, row in enumerate(epoch_rows):
        steps = [s for s in seen if s[0] == epoch]
        n = sum(s[4] for s in steps)
        want = {
            "train/loss_epoch": sum(s[1] * s[4] for s in steps) / n,
            "train/loss/click": sum(s[2]["click"] * s[4] for s in steps) / n,
            "train/loss/like": sum(s[2]["like"] * s[4] for s in steps) / n,
            "train/aux_loss": sum(s[3] * s[4] for s in steps) / n,
        }
        for key, value in want.items():
            assert abs(float(row[key]) - value) < 1e-5, (epoch, key)
        plain_mean = sum(s[1] for s in steps) / len(steps)
        assert abs(plain_mean - want["train/loss_epoch"]) > 1e-6

    step_rows = {
        int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")
    }
    assert sorted(step_rows) == [s for s in range(8) if (s + 1) % 3 == 0]  # Lightning's own rule
    for step, value in step_rows.items():
        assert abs(value - seen[step][1]) < 1e-6, step
    # 4 epoch keys x 2 epochs + the step loss on the due steps (2, 5 and each last batch)
    assert calls.count("train/loss_step") == 4
    assert len(calls) == 4 + 8
