"""LightningModule for multi-task ranking: trains a :class:`~mtl.models.rec.ranker.Ranker`.

Losses follow what the model predicts: BCE-with-logits for binary tasks in
``logits``, BCE on clamped probabilities for tasks in ``probs`` (ESMM's ctcvr), MSE
for regression; the total is the weighted sum of task losses plus the model's
``aux_loss``. Validation and test compute per-task AUC, log loss and (with user ids)
GAUC, plus the expert-health diagnostics of :mod:`mtl.training.diagnostics` and the
per-expert load of each multi-gate level (:mod:`mtl.training.expert_load`: in
``eval_loads`` and drawn in TensorBoard).
Training logs ``train/loss_step`` on the steps that the logger writes or the
progress bar shows, and the batch-size-weighted epoch means ``train/loss_epoch``,
``train/loss/<task>`` and ``train/aux_loss`` once per epoch
(:mod:`mtl.training.step_logging`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.data.tabular import RecBatch
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.ranker import Ranker
from mtl.moe.group_counts import count_routing_over
from mtl.training.diagnostics import DiagnosticsAccumulator, ExpertDiagnostics
from mtl.training.expert_load import ExpertLoad, log_load_histograms
from mtl.training.metrics import LOG_LOSS_EPS, BinaryTaskMetrics, RegressionTaskMetrics
from mtl.training.ranks import is_multi_process, rank_sum, trainer_world_size
from mtl.training.schedules import OptimizerFactory, SchedulerFactory, optimizers_with_schedule
from mtl.training.step_logging import EpochMeans, step_metrics_due


class RecModule(pl.LightningModule):
    """Train and evaluate a multi-task ranker on :class:`~mtl.data.tabular.RecBatch` data.

    Args:
        net: the ranker (feature embedding + multi-task model), built outside.
        optimizer: ``optimizer(params)`` (e.g. ``partial(torch.optim.Adam, lr=1e-3)``);
            None: Adam with lr 1e-3.
        scheduler: ``scheduler(optimizer)``, stepped every step; None for a constant rate.
        task_weights: loss weight per task name, overriding the spec's weights.
        seed: base of the per-epoch reseeding of torch's global RNG (dropout), which
            makes a run resumed at an epoch boundary replay the uninterrupted run.
        diagnostics: accumulate expert-health diagnostics during val/test.
        net_config: the config ``net`` was built from (``_target_`` nodes), kept in the
            checkpoint's hyper-parameters so that :func:`mtl.training.build.load_module`
            can rebuild the network.

    Shapes:
        ``forward(batch)`` with ``batch.cat (B, F_c)``, ``batch.num (B, F_n)`` returns a
        :class:`MultiTaskOutput` with ``logits``/``probs`` ``{task: (B,)}``.

    Example:
        >>> from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec
        >>> from mtl.models.rec import MMoE
        >>> from mtl.models.rec.embedding import FeatureEmbedding
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)], numeric=[],
        ...     tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")])
        >>> net = Ranker(embedding=FeatureEmbedding(spec=spec),
        ...              model=MMoE(d_in=4, tasks=spec.task_names, num_experts=2, expert_hidden=[8]))
        >>> module = RecModule(net=net)
        >>> batch = RecBatch(cat=torch.randint(0, 11, (5, 1)), num=torch.zeros(5, 0), labels=torch.ones(5, 2))
        >>> loss, parts = module.compute_loss(module(batch), batch.labels)
        >>> sorted(parts)
        ['click', 'like']
    """

    def __init__(
        self,
        *,
        net: Ranker,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        task_weights: Mapping[str, float] | None = None,
        seed: int = 0,
        diagnostics: bool = True,
        net_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = net.embedding.spec
        weights = {t.name: float(t.weight) for t in spec.tasks}
        unknown = sorted(set(task_weights or {}) - set(weights))
        if unknown:
            raise ValueError(
                f"task_weights names unknown tasks {unknown}; tasks are {list(weights)}"
            )
        weights.update({k: float(v) for k, v in (task_weights or {}).items()})
        # The checkpoint keeps plain values that rebuild the module (the optimizer lives in
        # the run's config.yaml: objects would not load with torch.load(weights_only=True)).
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.spec = spec
        self.task_names = spec.task_names
        self.task_kinds = {t.name: t.kind for t in spec.tasks}
        self.loss_weights = weights
        self.seed = int(seed)
        self.eval_metrics = nn.ModuleDict(
            {
                t.name: BinaryTaskMetrics() if t.kind == "binary" else RegressionTaskMetrics()
                for t in spec.tasks
            }
        )
        self.diag = DiagnosticsAccumulator(tasks=self.task_names) if diagnostics else None
        self.eval_results: dict[str, dict[str, float]] = {}
        """Per split (``"val"``/``"test"``), the flat metrics of the last evaluation."""
        self.eval_diagnostics: dict[str, ExpertDiagnostics] = {}
        """Per split, the diagnostics of the last evaluation."""
        self.test_scores: dict[str, tuple[Tensor, Tensor]] = {}
        """Per task, ``(predictions, labels)`` of the last test, ``(N,)`` each in row order."""
        self._test_rows: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._train_means = EpochMeans()
        self.eval_load = ExpertLoad()
        self.eval_loads: dict[str, dict[str, list[float]]] = {}
        """Per split, ``{"<split>/moe/layer{i}/tokens_per_expert": load}`` of the last
        evaluation: the (row, gate) slots each expert of multi-gate level ``i`` received,
        summed over the batches and over the ranks, each row counted once (every rank
        evaluates every row of an unsharded loader)."""
        self.epoch_times_s: list[float] = []
        """Wall time of each training epoch of this process (its validation included)."""
        self._epoch_start = 0.0

    monitor_prefixes: tuple[str, ...] = (
        "val/collapse_",
        "val/expert_scale_cv",
        "val/degraded_",
        "val/own_expert_share/",
    )
    """Diagnostics keys a run may also monitor (their task/expert suffix varies)."""

    @property
    def default_monitor(self) -> str:
        """``val/auc_mean`` when any task is binary, else ``val/loss``."""
        binary = any(kind == "binary" for kind in self.task_kinds.values())
        return "val/auc_mean" if binary else "val/loss"

    def monitor_keys(self) -> list[str]:
        """Validation metric keys this module logs (diagnostics keys aside)."""
        user = self.spec.user_column is not None
        keys = ["val/loss"]
        if "binary" in self.task_kinds.values():
            keys += ["val/auc_mean", "val/logloss_mean"] + (["val/gauc_mean"] if user else [])
        for task, kind in self.task_kinds.items():
            names = ["auc", "logloss"] + (["gauc"] if user else []) if kind == "binary" else ["mse"]
            keys += [f"val/loss/{task}", *[f"val/{n}/{task}" for n in names]]
        return keys

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        # data parallelism: the gates' auxiliary losses count every rank's rows (as the LM's
        # router losses do), so a run equals one process on the global batch
        if is_multi_process() and _has_gate_losses(self.net):
            count_routing_over(self.net, torch.distributed.group.WORLD)

    def forward(self, batch: RecBatch) -> MultiTaskOutput:
        return self.net(batch.cat, batch.num)

    @property
    def num_params(self) -> dict[str, int]:
        """``{"total", "embedding", "model"}`` trainable parameter counts."""

        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad)

        return {
            "total": count(self),
            "embedding": count(self.net.embedding),
            "model": count(self.net.model),
        }

    def predictions(self, out: MultiTaskOutput) -> dict[str, Tensor]:
        """``{task: (B,)}`` probabilities for binary tasks, raw values for regression ones."""
        preds: dict[str, Tensor] = {}
        for task in self.task_names:
            if task in out.probs:
                preds[task] = out.probs[task]
            elif self.task_kinds[task] == "binary":
                preds[task] = torch.sigmoid(out.logits[task].float())
            else:
                preds[task] = out.logits[task]
        return preds

    def compute_loss(
        self, out: MultiTaskOutput, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted task losses plus ``aux_loss``.

        Args:
            out: the model output.
            labels: (B, n_tasks) float32 in spec task order.

        Returns:
            ``(total, {task: loss})``, scalars.
        """
        parts: dict[str, Tensor] = {}
        # Losses in float32 outside autocast: BCE on probabilities is not autocast-safe
        # and bf16 logits lose the precision the loss needs.
        with torch.autocast(device_type=labels.device.type, enabled=False):
            for j, task in enumerate(self.task_names):
                y = labels[:, j].float()
                if task in out.probs:
                    p = out.probs[task].float().clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
                    parts[task] = F.binary_cross_entropy(p, y)
                elif task in out.logits:
                    z = out.logits[task].float()
                    kind = self.task_kinds[task]
                    parts[task] = (
                        F.binary_cross_entropy_with_logits(z, y)
                        if kind == "binary"
                        else F.mse_loss(z, y)
                    )
                else:
                    raise ValueError(
                        f"{type(self.net.model).__name__} returned no output for task {task!r} "
                        f"(logits: {list(out.logits)}, probs: {list(out.probs)})"
                    )
            total = sum(self.loss_weights[t] * v for t, v in parts.items()) + out.aux_loss.float()
        return total, parts  # type: ignore[return-value]

    # --------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        # Reseed per epoch so dropout masks depend only on (seed, epoch): a run resumed
        # from an end-of-epoch checkpoint then replays the uninterrupted run exactly.
        torch.manual_seed((self.seed * 1_000_003 + self.current_epoch) % (2**63))
        self._train_means.reset()
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: RecBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        loss, parts = self.compute_loss(out, batch.labels)
        bs = batch.batch_size
        # Epoch means accumulate on the device and are logged once per epoch, and the
        # step loss only when the logger or the progress bar reads it: each self.log
        # has a fixed host cost (mtl.training.step_logging says when they are due).
        values = {"train/loss_epoch": loss, **{f"train/loss/{t}": v for t, v in parts.items()}}
        if out.aux_loss.requires_grad:
            values["train/aux_loss"] = out.aux_loss
        self._train_means.update(values, bs)
        if step_metrics_due(self, batch_idx):
            self.log("train/loss_step", loss, prog_bar=True, batch_size=bs)
        return loss

    def on_train_epoch_end(self) -> None:
        # Lightning runs the epoch's validation before this hook: the time includes it.
        self.epoch_times_s.append(time.perf_counter() - self._epoch_start)
        for key, value in self._train_means.compute().items():
            self.log(key, value, prog_bar=key == "train/loss_epoch")

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"optimizer": torch.optim.Adam(self.parameters(), lr=1e-3)}
        return optimizers_with_schedule(self.optimizer(self.parameters()), self.scheduler)

    # ------------------------------------------------------------- evaluation
    def _eval_step(self, batch: RecBatch, split: str) -> None:
        out = self(batch)
        loss, parts = self.compute_loss(out, batch.labels)
        bs = batch.batch_size
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val", batch_size=bs)
        for task, value in parts.items():
            self.log(f"{split}/loss/{task}", value, on_epoch=True, batch_size=bs)
        preds = self.predictions(out)
        for j, task in enumerate(self.task_names):
            self.eval_metrics[task].update(preds[task], batch.labels[:, j], batch.user)
            if split == "test":  # kept for the paired significance tests of `mtl compare`
                rows = (preds[task].detach().float(), batch.labels[:, j].detach().float())
                self._test_rows.setdefault(task, []).append(rows)
        if self.diag is not None:
            self.diag.update(out)
        self.eval_load.add(out.expert_load)

    def _eval_epoch_end(self, split: str) -> None:
        flat: dict[str, float] = {}
        for task in self.task_names:
            for name, value in self.eval_metrics[task].compute().items():
                flat[f"{name}/{task}"] = value
            self.eval_metrics[task].reset()
        for name in ("auc", "gauc", "logloss"):
            values = [v for k, v in flat.items() if k.startswith(f"{name}/") and not math.isnan(v)]
            if values:
                flat[f"{name}_mean"] = sum(values) / len(values)
        if self.diag is not None and self.diag.has_data:
            diag = self.diag.compute()
            self.eval_diagnostics[split] = diag
            flat.update(diag.scalars())
            self.diag.reset()
        # Metric states are synced by torchmetrics in compute(): no sync_dist here.
        for key, value in flat.items():
            self.log(f"{split}/{key}", value, prog_bar=key == "auc_mean")
        self.eval_results[split] = flat
        if self.eval_load.has_data:
            if trainer_world_size(self) > 1:
                replicas = self._eval_replicas(split)
                reduce_sum = rank_sum(self)
                self.eval_load.reduce(lambda t: reduce_sum(t) / replicas)
            self.eval_loads[split] = self.eval_load.as_dict(f"{split}/moe/")
            log_load_histograms(self.loggers, self.eval_loads[split], self.global_step)
            self.eval_load.reset()

    def _eval_replicas(self, split: str) -> int:
        """How many ranks evaluate each row: every rank when the loader is not sharded
        (:class:`~mtl.data.datamodule.RecDataModule`'s evaluation), one when it is."""
        trainer = self.trainer
        loader = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
        shards = getattr(loader, "num_shards", None)
        return max(1, trainer_world_size(self) // shards) if shards else 1

    def _eval_epoch_start(self) -> None:
        for metrics in self.eval_metrics.values():
            metrics.reset()
        if self.diag is not None:
            self.diag.reset()
        self.eval_load.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()

    def validation_step(self, batch: RecBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()
        self._test_rows = {}

    def test_step(self, batch: RecBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self.test_scores = {
            task: (torch.cat([p for p, _ in rows]).cpu(), torch.cat([y for _, y in rows]).cpu())
            for task, rows in self._test_rows.items()
        }
        self._test_rows = {}

    def predict_step(self, batch: RecBatch, batch_idx: int) -> dict[str, Tensor]:
        return self.predictions(self(batch))


def _has_gate_losses(net: nn.Module) -> bool:
    """Whether a model of ``net`` weights gate auxiliary losses (else counts would go unused)."""
    return any(any((getattr(m, "aux_loss_weights", None) or {}).values()) for m in net.modules())
