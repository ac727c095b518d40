"""``trainer=fsdp``: FSDP2 (``fully_shard`` per transformer block) through Lightning's
``ModelParallelStrategy``, with two real CPU processes (gloo).

Lightning's own ``strategy="fsdp"`` (torch's first FSDP) is refused on CPU by Lightning
("requires a GPU accelerator") and by torch ("FSDP needs a non-CPU accelerator
device"); the config check names that before any process starts. FSDP2 runs on CPU, so
the sharded run is compared with the single-process run here: the reference is the
same as for DDP (``test_ddp_lm.py``): one process reading the global batch of ``2B``,
since the router losses count every rank's tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl.training.build import build
from mtl.training.config import ConfigError, compose_config
from mtl.training.config_checks import check_distributed
from mtl.training.fsdp import FSDPStrategy

# The tiny LM and its helpers are the DDP test's: one definition of the reference run.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.training.test_ddp_lm import LM, SINGLE, STEPS, VAL_BATCH, B, _cli, _last, _weights  # noqa: E402

FSDP = ["trainer=fsdp", "trainer.devices=2", f"data.steps_per_epoch={STEPS}"]
FSDP += [f"data.val_batch_size={VAL_BATCH}"]


def test_fsdp_config_composes_and_builds_the_strategy() -> None:
    cfg = compose_config("train", ["experiment=lm_olmoe", "trainer=fsdp"])
    check_distributed(cfg)
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.devices == 2
    strategy = build(cfg.trainer.strategy, what="trainer.strategy")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.param_dtype is None and strategy.reshard_after_forward
    assert strategy._save_distributed_checkpoint is False  # one checkpoint file
    bf16 = build(
        OmegaConf.merge(
            cfg.trainer.strategy, {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
        ),
        what="trainer.strategy",
    )
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match=r"trainer.strategy.param_dtype must be one of"):
        FSDPStrategy(param_dtype="bf16")  # type: ignore[arg-type]


def test_fsdp_refusals_name_the_key_and_the_alternative() -> None:
    with pytest.raises(ConfigError, match=r"rankers \(kind: rec\) train with trainer=ddp"):
        check_distributed(compose_config("train", ["trainer=fsdp"]))
    # Lightning's string strategy on CPU: torch's first FSDP needs CUDA.
    cfg = compose_config("train", ["experiment=lm_olmoe", "trainer=ddp", "trainer.strategy=fsdp"])
    cfg.trainer.accelerator = "cpu"
    with pytest.raises(ConfigError, match=r"torch's first FSDP, which needs CUDA.*trainer=fsdp"):
        check_distributed(cfg)
    cfg.trainer.accelerator = "gpu"
    check_distributed(cfg)


@pytest.mark.slow
def test_two_process_fsdp_lm_run_equals_one_process_and_resumes_both_ways(tmp_path: Path) -> None:
    from mtl.training.train import train

    fsdp_dir, single_dir = tmp_path / "fsdp", tmp_path / "single"
    done = _cli(fsdp_dir, [*FSDP, "trainer.max_steps=20"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr
    single = train(
        compose_config("train", [*LM, *SINGLE, "trainer.max_steps=20", f"output_dir={single_dir}"])
    )
    got = json.loads((fsdp_dir / "metrics.json").read_text())
    assert got["global_step"] == single["global_step"] == 20
    for key in ("val_loss", "val_ppl"):
        assert got[key] == pytest.approx(single[key], rel=1e-5), key
    for key, value in single["routing"].items():
        assert got["routing"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # One full checkpoint file, written once, with the one-process keys and shapes.
    names = sorted(p.name for p in (fsdp_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (single_dir / "checkpoints").iterdir())
    want, weights = _weights(_last(single_dir)), _weights(_last(fsdp_dir))
    assert weights.keys() == want.keys()
    for key in want:
        assert type(weights[key]) is torch.Tensor  # gathered, not a DTensor shard
        torch.testing.assert_close(weights[key], want[key], rtol=1e-4, atol=1e-5, msg=key)

    # The sharded checkpoint resumes in one process (global batch 2B) as the one-process
    # checkpoint of the same step does.
    whole = [f"data.batch_size={2 * B}", f"data.steps_per_epoch={STEPS}"]
    whole += ["trainer.max_steps=30", "resume=last"]
    runs = {name: tmp_path / name for name in ("ref", "one_to_fsdp", "one_to_one")}
    for out_dir in runs.values():
        shutil.copytree(single_dir, out_dir)
    for out_dir in (fsdp_dir, runs["ref"]):
        train(compose_config("train", [*LM, *whole, f"output_dir={out_dir}"]))
    want, weights = _weights(_last(runs["ref"])), _weights(_last(fsdp_dir))
    for key in want:
        torch.testing.assert_close(weights[key], want[key], rtol=1e-4, atol=1e-5, msg=key)

    # A one-process checkpoint resumes sharded, as it does in one process.
    more = ["trainer.max_steps=30", "resume=last"]
    done = _cli(runs["one_to_fsdp"], [*FSDP, *more])
    assert done.returncode == 0, done.stderr[-3000:]
    train(compose_config("train", [*LM, *SINGLE, *more, f"output_dir={runs['one_to_one']}"]))
    assert json.loads((runs["one_to_fsdp"] / "metrics.json").read_text())["global_step"] == 30
    want, weights = _weights(_last(runs["one_to_one"])), _weights(_last(runs["one_to_fsdp"]))
    for key in want:
        torch.testing.assert_close(weights[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
