"""train() on LMs end to end: below the unigram entropy; CLI; bad input; resume checks.

Fast tests run in the default suite; ``-m slow`` trains every preset family member.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl.training.config import compose_config
from mtl.training.lm_module import VocabularyMismatchError
from mtl.training.train import train

TINY = [
    "model.n_layers=2",
    "data.block_size=64",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=25",
    "generate.max_new_tokens=60",
]


def run(overrides: list[str]) -> dict[str, Any]:
    return train(compose_config("train", overrides))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shakespeare(path: Path, tmp_path: Path, steps: int, *extra: str) -> dict[str, Any]:
    return run(
        [
            "data=lm_shakespeare",
            f"data.path={path}",
            "data.steps_per_epoch=100000",  # one epoch; validation by train() at the end
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=20",
            "optim.lr=1e-2",
            "scheduler.warmup_steps=20",
            f"output_dir={tmp_path}",
            *TINY,
            *extra,
        ]
    )


def test_tiny_moe_learns_shakespeare_fast(shakespeare_path: Path, tmp_path: Path) -> None:
    """A 2-layer 4-expert top-2 model, 300 steps of 16 x 64 characters (~15 s on one core)."""
    res = _shakespeare(
        shakespeare_path,
        tmp_path,
        300,
        "experiment=lm_mixtral",
        "model.moe.num_experts=4",
        "model.moe.experts.d_hidden=64",
    )
    assert res["global_step"] == 300
    assert 3.0 < res["unigram_entropy"] < 3.6  # ~3.35 nats for Shakespeare's 65 characters
    assert res["val_loss"] < res["unigram_entropy"] - 0.8
    assert res["val_loss"] < res["bigram_entropy"]
    assert res["val_ppl"] == pytest.approx(torch.tensor(res["val_loss"]).exp().item(), rel=1e-4)
    assert set(res["routing"]) >= {
        "val/moe/layer0/load_max_over_mean",
        "val/moe/layer1/router_entropy",
    }
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(res["val_loss"])
    assert (tmp_path / "csv" / "metrics.csv").is_file() and Path(res["last_ckpt"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment",
    [
        "lm_dense",
        "lm_mixtral",
        "lm_switch",
        "lm_deepseekmoe",
        "lm_olmoe",
        "lm_top_p",
        "lm_deepseek_v3",
    ],
)
def test_preset_family_learns_shakespeare(
    shakespeare_path: Path, tmp_path: Path, experiment: str
) -> None:
    """Every causal preset at its configured size, 600 steps, dense and MoE alike."""
    res = _shakespeare(
        shakespeare_path, tmp_path, 600, f"experiment={experiment}", "model.n_layers=4"
    )
    print(
        f"{experiment}: val {res['val_loss']:.3f} unigram {res['unigram_entropy']:.3f} "
        f"bigram {res['bigram_entropy']:.3f} {res['train_time_s']:.0f}s"
    )
    assert res["val_loss"] < res["unigram_entropy"] - 1.0


def test_cli_trains_lm_experiment_on_embedded_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtl.cli import main

    tiny = [o for o in TINY if not o.startswith("trainer.log_every_n_steps")]
    status = main(
        [
            "train",
            "experiment=lm_deepseek_v3",
            "trainer.max_steps=4",
            "data.steps_per_epoch=2",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            f"output_dir={tmp_path}",
            *tiny,
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "sample:" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"] == "<embedded corpus>" and metrics["global_step"] == 4
    assert metrics["model"] == "lm_deepseek_v3"
    # the LM callbacks include AuxFreeBiasUpdate, which balances SigmoidBiasGate layers
    assert "moe/layer1/bias_absmax" in (tmp_path / "csv" / "metrics.csv").read_text()


def test_bad_text_input_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    base = ["experiment=lm_dense", "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}", *TINY]
    with pytest.raises(ValueError, match="empty"):
        run([*base, f"data.path={empty}"])
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 5)
    with pytest.raises(ValueError, match="block_size=64 is too large"):
        run([*base, f"data.path={short}"])
    with pytest.raises(FileNotFoundError, match="not found"):
        run([*base, f"data.path={tmp_path / 'missing.txt'}"])


def test_resume_checks_vocabulary(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the cat sat on the mat. " * 400)
    b.write_text("the dog sat on the log. " * 400)
    common = ["experiment=lm_dense", "data.steps_per_epoch=2", "trainer.limit_val_batches=1", *TINY]
    first = run([*common, f"data.path={a}", "trainer.max_steps=2", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(VocabularyMismatchError, match="vocabulary mismatch"):
        run(
            [
                *common,
                f"data.path={b}",
                "trainer.max_steps=4",
                f"resume={first['last_ckpt']}",
                f"output_dir={tmp_path / 'r2'}",
            ]
        )
    again = run(
        [
            *common,
            f"data.path={a}",
            "trainer.max_steps=4",
            f"resume={first['last_ckpt']}",
            f"output_dir={tmp_path / 'r3'}",
        ]
    )
    assert again["global_step"] == 4


def test_run_shorter_than_an_epoch_keeps_a_validated_best_checkpoint(tmp_path: Path) -> None:
    res = run(
        [
            "experiment=lm_mixtral",
            "trainer.max_steps=3",
            "data.steps_per_epoch=50",  # the run ends inside its first epoch
            "trainer.limit_val_batches=1",
            f"output_dir={tmp_path}",
            *TINY,
        ]
    )
    assert res["global_step"] == 3
    assert res["best_ckpt"] is not None and Path(res["best_ckpt"]).name == "best-step000003.ckpt"
