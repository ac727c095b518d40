"""No result from a broken run: non-finite stops, the monitor fallback, LM divergence.

Each test reproduces a case where a run used to end with exit status 0 and a
meaningless result, or crash after training: an ``inf`` in a training batch, a
learning rate of 1e6, a validation split with a single class per task, an LM
whose losses overflow.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest
import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from mtl.cli import main
from mtl.data.datamodule import RecDataModule
from mtl.training.config import compose_config
from mtl.training.finite_guard import FiniteGuard, NonFiniteError, non_finite_inputs
from mtl.training.monitor_fallback import MonitorFallback
from mtl.training.results import summary
from mtl.training.train import train

FAST = ["trainer.enable_progress_bar=false", "num_threads=1"]
SMALL_CTR = {"n": 3000, "n_users": 100, "n_items": 50}
SMALL_MODEL = ["model.num_experts=2", "model.expert_hidden=[16]", "model.tower_hidden=[8]"]
TINY_LM = [
    "experiment=lm_dense",
    "model.n_layers=1",
    "model.d_model=32",
    "model.d_ff=64",
    "data.block_size=16",
    "data.batch_size=8",
    "data.steps_per_epoch=10",
    "generate.max_new_tokens=10",
    *FAST,
]


def _ctr_overrides(out: Path) -> list[str]:
    return [
        *[f"data.source_kwargs.{k}={v}" for k, v in SMALL_CTR.items()],
        "data.batch_size=256",
        *SMALL_MODEL,
        f"output_dir={out}",
        *FAST,
    ]


# ------------------------------------------------------------------ non-finite training
def test_inf_in_a_training_batch_stops_the_run_naming_the_column(tmp_path: Path) -> None:
    dm = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, batch_size=256)
    dm.setup("fit")
    # The loaders refuse inf at load time; a batch can still carry one from a
    # data module built in code, which is what this constructs.
    dm.tensors("train").num_BF[5, 0] = math.inf
    column = dm.spec.numeric[0].name
    out = tmp_path / "run"
    cfg = compose_config("train", [*_ctr_overrides(out), "trainer.max_epochs=2"])
    with pytest.raises(NonFiniteError, match=r"at step \d+ \(epoch 0, batch \d+\)") as info:
        train(cfg, datamodule=dm)
    assert f"non-finite values in [{column!r}]" in str(info.value)
    assert "no metrics.json" in str(info.value)
    assert not (out / "metrics.json").exists()


def test_huge_learning_rate_fails_the_cli_run_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # The default synthetic data, fewer rows: with lr=1e6 the loss overflows in ~12 steps.
    rc = main(
        [
            "train",
            "optim.lr=1e6",
            "data.source_kwargs.n=20000",
            "trainer.max_steps=30",
            f"output_dir={out}",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "at step" in lines[0] and "learning rate (now 1e+06)" in lines[0]
    assert "Traceback" not in err
    assert not (out / "metrics.json").exists()
    assert "test metrics" not in capsys.readouterr().out


class _Tiny(LightningModule):
    """One linear layer; ``lr=nan`` makes its first optimizer step write NaN weights."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).squeeze(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit_tiny(module: _Tiny, tmp_path: Path, **trainer_kwargs: Any) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(16, 2), torch.randn(16))
    trainer = Trainer(
        max_epochs=1,
        callbacks=[FiniteGuard()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **trainer_kwargs,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))


def test_non_finite_parameters_after_a_step_stop_with_their_names(tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteError,
        match=r"parameters became non-finite in the optimizer step at step 1 .*layer\.weight",
    ):
        _fit_tiny(_Tiny(lr=math.nan), tmp_path)
    _fit_tiny(_Tiny(lr=0.01), tmp_path)  # a healthy run passes the same guard


def test_non_finite_inputs_names_columns_or_tensors() -> None:
    batch = (torch.tensor([[1.0, math.nan]]), torch.tensor([1, 2]))
    assert non_finite_inputs(batch, LightningModule()) == ["batch[0]"]
    assert non_finite_inputs({"x": torch.ones(2)}, LightningModule()) == []


def _stub_trainer(metrics: dict[str, Any]) -> Any:
    group = {"lr": 3e-4}
    return SimpleNamespace(
        sanity_checking=False,
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        global_step=40,
        current_epoch=1,
        optimizers=[SimpleNamespace(param_groups=[group])],
    )


def test_non_finite_validation_loss_stops_the_run() -> None:
    guard = FiniteGuard()
    guard.on_validation_end(_stub_trainer({"val/loss": 2.5}), LightningModule())
    with pytest.raises(NonFiniteError, match=r"val/loss is nan after step 40 .*0\.0003"):
        guard.on_validation_end(_stub_trainer({"val/loss": math.nan}), LightningModule())


# ------------------------------------------------------------------ LM divergence
def test_diverged_lm_run_ends_with_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    cfg = compose_config(
        "train", [*TINY_LM, "optim.lr=1e6", "trainer.max_steps=20", f"output_dir={out}"]
    )
    # Before: a NaN model reached generation (RuntimeError from torch.multinomial).
    with pytest.raises(NonFiniteError, match=r"(training loss|val/loss|parameters).*step \d+"):
        train(cfg)
    assert not (out / "metrics.json").exists()


def test_lm_summary_says_the_perplexity_overflowed() -> None:
    result = {
        "kind": "lm",
        "model": "lm_dense",
        "val_loss": 95.0,  # exp(95) overflows float32: the logged val/ppl is inf, stored as null
        "val_ppl": None,
        "unigram_entropy": 3.2,
        "bigram_entropy": 2.5,
        "global_step": 20,
        "train_time_s": 1.0,
        "params": {"total": 10, "active": 10},
        "sample": "",
        "output_dir": "runs/x",
    }
    text = summary(result)
    assert "val loss 95.0000" in text and "ppl overflows float32" in text


# ------------------------------------------------------------------ monitor fallback
def _ali_ccp_frame(n: int, offset: int = 0, positives: bool = True) -> pl.DataFrame:
    i = pl.int_range(offset, offset + n, eager=True)
    return pl.DataFrame(
        {
            "click": (i % 3 == 0).cast(pl.Int64) * int(positives),
            "purchase": (i % 9 == 0).cast(pl.Int64) * int(positives),
            "101": i % 7,
            "205": i % 11,
            "D508": (i % 5).cast(pl.Float64),
        }
    )


def _single_class_val_dir(root: Path) -> Path:
    root.mkdir()
    _ali_ccp_frame(120).write_csv(root / "ali_ccp_train.csv")
    _ali_ccp_frame(30, 120, positives=False).write_csv(root / "ali_ccp_val.csv")  # no positives
    _ali_ccp_frame(40, 150).write_csv(root / "ali_ccp_test.csv")
    return root


def _ali_ccp_overrides(data: Path, out: Path) -> list[str]:
    return [
        "data=ali_ccp",
        f"data.path={data}",
        "data.categorical=['101','205']",  # the fields these small files have
        "data.numeric=[D508]",
        "data.batch_size=32",
        *SMALL_MODEL,
        "trainer.max_epochs=2",
        f"output_dir={out}",
        *FAST,
    ]


@pytest.mark.parametrize("monitor", ["auto", "val/auc/click"])
def test_uncomputable_monitor_falls_back_to_val_loss_with_one_warning(
    monitor: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _single_class_val_dir(tmp_path / "data")
    out = tmp_path / "run"
    cfg = compose_config("train", [*_ali_ccp_overrides(data, out), f"monitor={monitor}"])
    with caplog.at_level(logging.WARNING, logger="mtl.training.monitor_fallback"):
        result = train(cfg)
    warnings = [r for r in caplog.records if r.name == "mtl.training.monitor_fallback"]
    assert len(warnings) == 1  # two validations, one warning
    assert "val/loss" in warnings[0].getMessage()
    assert result["monitor"] == "val/loss" and result["best_ckpt"]
    assert result["epochs"] == 2  # early stopping watched val/loss too, it did not stop the run
    assert math.isnan(result["last_val"]["auc/click"])  # undefined, as reported before
    assert result["test"]["auc/click"] > 0.0  # the test split has both classes
    assert "best checkpoint by val/loss" in summary(result)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["last_val"]["auc/click"] is None and saved["monitor"] == "val/loss"


def test_a_computable_monitor_is_kept() -> None:
    fallback = MonitorFallback()
    checkpoint = ModelCheckpoint(monitor="val/auc_mean", mode="max")
    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={"val/loss": torch.tensor(0.5), "val/auc_mean": torch.tensor(0.7)},
        callbacks=[fallback, checkpoint],
    )
    fallback.on_validation_end(trainer, LightningModule())  # type: ignore[arg-type]
    assert checkpoint.monitor == "val/auc_mean" and fallback.replaced == []
    trainer.callback_metrics = {"val/loss": torch.tensor(0.5)}  # decided at the first validation
    fallback.on_validation_end(trainer, LightningModule())  # type: ignore[arg-type]
    assert checkpoint.monitor == "val/auc_mean"


def test_resume_of_a_fallback_run_keeps_ranking_by_val_loss(tmp_path: Path) -> None:
    data = _single_class_val_dir(tmp_path / "data")
    out = tmp_path / "run"
    first = train(compose_config("train", [*_ali_ccp_overrides(data, out), "trainer.max_epochs=1"]))
    resumed = train(compose_config("train", [*_ali_ccp_overrides(data, out), "resume=last"]))
    assert first["monitor"] == resumed["monitor"] == "val/loss"
    assert resumed["epochs"] == 2
    state = torch.load(resumed["last_ckpt"], map_location="cpu", weights_only=False)["callbacks"]
    checkpoint_keys = [k for k in state if k.startswith("ModelCheckpoint")]
    assert checkpoint_keys and all("'monitor': 'val/loss'" in k for k in checkpoint_keys)


def test_ali_express_sample_recipe_runs_to_the_end(
    aliexpress_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ali"
    # The dataset recipe's own command: its validation split has no positives.
    rc = main(
        [
            "train",
            "data=aliexpress",
            f"data.path={aliexpress_dir}",
            "trainer.max_epochs=1",
            f"output_dir={out}",
            *FAST,
        ]
    )
    assert rc == 0
    assert "best checkpoint by val/loss" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["monitor"] == "val/loss"
