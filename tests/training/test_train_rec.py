"""train() on rankers end to end: resume, Census-Income quality floor, `mtl compare` artefacts.

Sizes are tiny and runs single-threaded (``num_threads=1``: fastest for these
models, and robust on a shared 2-core machine).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from mtl.cli import main
from mtl.training.config import compose_config
from mtl.training.train import train

FAST = ["trainer.enable_progress_bar=false", "num_threads=1"]
SMALL_DATA = [
    "data.source_kwargs.n=6000",
    "data.source_kwargs.n_users=200",
    "data.source_kwargs.n_items=100",
    "data.batch_size=512",
    *FAST,
]
SMALL_CTR = [*SMALL_DATA, "model.expert_hidden=[16]", "model.tower_hidden=[8]"]


def _metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def test_mtl_train_synthetic_default_learns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "data.source_kwargs.n=20000",
            "data.source_kwargs.n_users=300",
            "data.source_kwargs.n_items=200",
            "data.batch_size=512",
            "model.num_experts=4",
            "model.expert_hidden=[32]",
            "model.tower_hidden=[16]",
            "optim.lr=3e-3",
            "trainer.max_epochs=3",
            f"output_dir={out}",
            *FAST,
        ]
    )
    assert rc == 0
    m = _metrics(out)
    assert m["model"] == "mmoe" and m["monitor"] == "val/auc_mean"
    # Measured 0.738 (click) / 0.78 (like) / 0.82 (conversion); 0.65 leaves room for seeds/BLAS.
    assert m["test"]["auc/click"] > 0.65
    for task in ("click", "like", "conversion"):
        assert 0.0 < m["test"][f"logloss/{task}"] < 1.0
        assert 0.5 < m["test"][f"gauc/{task}"] <= 1.0  # synthetic_ctr has user ids
    assert m["diagnostics"]["expert_kinds"] == ["shared"] * 4
    assert m["params"]["model"] < m["params"]["total"]
    assert (out / "checkpoints" / "last.ckpt").is_file() and Path(m["best_ckpt"]).is_file()
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/auc/click" in header and "val/collapse_zero_frac_max" in header
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "auc" in capsys.readouterr().out


def test_census_income_reaches_auc_floor(tmp_path: Path, census_path: Path) -> None:
    """MMoE on the full public Census-Income test file (80k train rows), 2 epochs.

    Measured income test AUC 0.943-0.944 over seeds 0-2 (the MMoE paper reports ~0.94
    on the full data); the floor is 0.93.
    """
    out = tmp_path / "census"
    rc = main(
        [
            "train",
            "experiment=census_mmoe",
            f"data.path={census_path}",
            "data.batch_size=1024",
            "model.expert_hidden=[32]",
            "optim.lr=3e-3",
            "trainer.max_epochs=2",
            f"output_dir={out}",
            *FAST,
        ]
    )
    assert rc == 0
    test = _metrics(out)["test"]
    assert test["auc/income"] >= 0.93
    assert test["auc/never_married"] >= 0.97
    assert "gauc/income" not in test  # census has no user column


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(tmp_path: Path) -> None:
    # Learnable settings so the best checkpoint is the last epoch, i.e. trained after the
    # resume; dropout makes the test fail unless the RNG is reseeded per epoch.
    common = [
        *SMALL_CTR,
        "data.source_kwargs.n=10000",
        "optim.lr=3e-3",
        "model.num_experts=3",
        "model.dropout=0.2",
        "callbacks.early_stopping=null",
        "seed=3",
    ]

    def run(epochs: int, out: Path, *extra: str) -> dict:
        overrides = [*common, *extra, f"trainer.max_epochs={epochs}", f"output_dir={out}"]
        return train(compose_config("train", overrides))

    full = run(3, tmp_path / "a")
    first = run(1, tmp_path / "b")
    resumed = run(3, tmp_path / "b", "resume=last")
    assert first["epochs"] == 1 and resumed["global_step"] == full["global_step"]
    assert Path(full["best_ckpt"]).name == Path(resumed["best_ckpt"]).name == "best-epoch002.ckpt"
    for split in ("test", "last_val"):
        for key, value in full[split].items():
            assert resumed[split][key] == pytest.approx(value, abs=1e-6, nan_ok=True), (split, key)


def test_resume_with_missing_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["train", *SMALL_CTR, f"output_dir={tmp_path}", "resume=last"])
    assert rc == 2
    assert "resume checkpoint not found" in capsys.readouterr().err


def test_regression_data_trains_with_val_loss_monitor(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            "data=synthetic_mmoe",
            "data.source_kwargs.n=3000",
            "data.source_kwargs.d=16",
            "model.num_experts=2",
            "model.expert_hidden=[16]",
            "trainer.max_epochs=1",
            f"output_dir={tmp_path}",
            *FAST,
        ],
    )
    result = train(cfg)
    assert result["monitor"] == "val/loss"
    assert set(result["test"]) >= {"mse/y1", "mse/y2"} and math.isfinite(result["test"]["mse/y1"])


def test_esmm_probability_task_trains_end_to_end(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *SMALL_DATA,
            "model=esmm",
            "model.tower_hidden=[8]",
            "data.source_kwargs.tasks=[ctr,ctcvr]",
            "trainer.max_epochs=1",
            f"output_dir={tmp_path}",
        ],
    )
    result = train(cfg)
    assert 0.0 < result["test"]["logloss/ctcvr"] < 1.0 and "auc/ctcvr" in result["test"]
    assert result["diagnostics"] is None  # no gates, no experts: nothing to diagnose


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path) -> None:
    # The GPU trainer config uses bf16-mixed; the same autocast path runs on CPU.
    overrides = [*SMALL_CTR, "model.num_experts=2", "trainer.max_epochs=1"]
    overrides += ["trainer.precision=bf16-mixed", f"output_dir={tmp_path}"]
    result = train(compose_config("train", overrides))
    assert all(
        math.isfinite(result["test"][f"logloss/{t}"]) for t in ("click", "like", "conversion")
    )


def test_unknown_monitor_key_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            *SMALL_CTR,
            "trainer.max_epochs=1",
            "monitor=val/auc_maen",
            f"output_dir={tmp_path}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "val/auc_maen" in err


def test_mtl_compare_writes_report_results_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "models=[mmoe,home]",
            "seeds=2",
            *SMALL_CTR,
            "trainer.max_epochs=1",
            # model.* overrides go to the models whose config has the key; model_overrides to one.
            "model.num_experts=3",
            "model.lora_rank=4",
            "+model_overrides.home.num_shared_experts=2",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in results["runs"]] == [
        ("mmoe", 0),
        ("mmoe", 1),
        ("home", 0),
        ("home", 1),
    ]
    kinds = results["summary"]["home"]["diagnostics"]["expert_kinds"]
    assert (
        kinds.count("shared") == 2
        and len(results["summary"]["mmoe"]["diagnostics"]["expert_kinds"]) == 3
    )
    # Identical splits: the test positive rate is the same in every run.
    rates = {r["test"]["pos_rate/like"] for r in results["runs"]}
    assert len(rates) == 1
    report = (out / "report.md").read_text()
    # First table: AUC with its 95% interval per task and model, then the paired tests.
    first = report.split("\n## ")[1]
    assert first.startswith("Test AUC with intervals")
    for task in ("click", "like", "conversion"):
        for model in ("mmoe", "home"):
            row = next(r for r in first.splitlines() if r.startswith(f"| {task} | {model} |"))
            auc, interval = (c.strip() for c in row.split("|")[3:5])
            low, high = (float(v) for v in interval.strip("[]").split(","))
            assert 0.0 <= low < float(auc) < high <= 1.0, row
            # The saved scores give the AUC the run's metrics report (mean over seeds).
            mean = statistics.fmean(
                r["test"][f"auc/{task}"] for r in results["runs"] if r["model"] == model
            )
            assert float(auc) == pytest.approx(mean, abs=1e-4)
        pair = next(r for r in first.splitlines() if r.startswith(f"| {task} | mmoe − home |"))
        assert f"on {task}: +" in pair and "significant" in pair
        assert results["significance"]["tasks"][task]["pairs"][0]["seeds"] == [0, 1]
    for r in results["runs"]:
        assert (Path(r["output_dir"]) / r["test_scores"]).is_file()
    models_part = report.split("## Models")[1].split("##")[0]
    tasks_part = report.split("## Test metrics per task")[1].split("##")[0]
    for model in ("mmoe", "home"):
        row = next(line for line in models_part.splitlines() if line.startswith(f"| {model} |"))
        assert "n/a" not in row and "±" in row
        for task in ("click", "like", "conversion"):
            row = next(
                line for line in tasks_part.splitlines() if line.startswith(f"| {task} | {model} |")
            )
            cells = [c.strip() for c in row.split("|")[3:6]]  # AUC, GAUC, log loss
            assert all(c.count("±") == 1 and float(c.split("±")[0]) > 0 for c in cells), row
    assert "Δ AUC vs mmoe" in tasks_part and "## Expert diagnostics" in report
    for png in (
        "auc.png",
        "gauc.png",
        "gates_mmoe.png",
        "gates_home.png",
        "collapse.png",
        "degradation.png",
    ):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert "Test metrics" in capsys.readouterr().out


def test_compare_unknown_model_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["compare", "models=[mmoe,transformer9000]", f"output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: unknown model 'transformer9000'")
        and "home" in err
        and "\n" not in err
    )


def test_run_shorter_than_an_epoch_validates_and_keeps_a_best_checkpoint(tmp_path: Path) -> None:
    """max_steps inside the first epoch: early stopping and the checkpoint need val metrics."""
    cfg = compose_config("train", [*SMALL_CTR, "trainer.max_steps=3", f"output_dir={tmp_path}"])
    m = train(cfg)
    assert m["global_step"] == 3
    assert Path(m["best_ckpt"]).name == "best-epoch000.ckpt" and Path(m["best_ckpt"]).is_file()
    assert 0.0 < m["test"]["auc/click"] < 1.0  # tested from that checkpoint
