"""``trainer=ddp`` with two real CPU processes (gloo): a DDP run of a small MMoE equals the
single-process run with the same global batch and seed, each rank reads its own rows,
metrics cover every rank's rows, checkpoints are written once and resume in one process.

Same global batch: each rank's batch is half the single-process batch, and the strided
shards of :class:`~mtl.data.tensor_loader.TensorBatchLoader` make the two halves of global
batch ``b`` exactly the rows of the single-process batch ``b``; DDP averages the two
half-batch gradients, which is the gradient of the full-batch mean. Dropout is off and
the MMoE has no batch norm, so nothing else differs (with batch norm each rank would
normalise with its own half: ``sync_batchnorm`` is off in ``conf/trainer/ddp.yaml``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Light imports only at the top: the spawned metric workers import this module, and
# Lightning and the models would double their start-up time on a small machine.
from mtl.data.tabular import TabularTensors
from mtl.data.tensor_loader import TensorBatchLoader
from mtl.training.metrics import BinaryTaskMetrics
from mtl.training.ranks import is_launch_rank_zero

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 256
# 4000 rows -> 3200 train rows: 12.5 global batches, and the last half-batch splits evenly.
RUN = [
    "data.source_kwargs.n=4000",
    "data.source_kwargs.n_users=100",
    "data.source_kwargs.n_items=50",
    "model.num_experts=2",
    "model.expert_hidden=[8]",
    "model.tower_hidden=[4]",
    "model.dropout=0.0",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _epoch_losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("train/loss_epoch")
    return [float(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]


def _ddp_cli(out_dir: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    # The real command line: Lightning's launcher re-runs it for rank 1 with LOCAL_RANK=1.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    cmd = [sys.executable, "-m", "mtl.cli", "train", "trainer=ddp", "trainer.devices=2"]
    cmd += [*RUN, *extra, f"data.batch_size={GLOBAL_BATCH // 2}", f"output_dir={out_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "exact"),
    [
        pytest.param([], True, id="no-batch-norm"),
        # Batch-norm experts without SyncBatchNorm (torch has it for GPUs only): each rank
        # normalises with its half batch's statistics and DDP broadcasts rank 0's running
        # statistics, so the run is close to, but not equal to, the full-batch run.
        pytest.param(["model.expert_norm=true"], False, id="batch-norm-per-rank"),
    ],
)
def test_two_process_ddp_run_equals_one_process_and_resumes_in_one(
    tmp_path: Path, model: list[str], exact: bool
) -> None:
    from mtl.training.config import compose_config
    from mtl.training.train import train

    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    done = _ddp_cli(ddp_dir, model)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr  # two processes really ran
    assert done.stdout.count("test metrics") == 1  # one summary, from rank 0
    single = train(
        compose_config(
            "train",
            [*RUN, *model, f"data.batch_size={GLOBAL_BATCH}", f"output_dir={single_dir}"],
        )
    )
    ddp = json.loads((ddp_dir / "metrics.json").read_text())

    # Same optimizer steps, losses and final weights.
    assert ddp["global_step"] == single["global_step"] == 2 * math.ceil(3200 / GLOBAL_BATCH)
    want = _weights(single_dir / "checkpoints" / "last.ckpt")
    got = _weights(ddp_dir / "checkpoints" / "last.ckpt")
    assert got.keys() == want.keys()
    if not exact:
        assert _epoch_losses(ddp_dir) == pytest.approx(_epoch_losses(single_dir), rel=0.05)
        stats = [k for k in want if k.endswith("running_var")]
        assert stats and not all(torch.allclose(got[k], want[k], rtol=1e-4) for k in stats)
        return
    assert _epoch_losses(ddp_dir) == pytest.approx(_epoch_losses(single_dir), rel=1e-5)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)

    # AUC, GAUC and log loss over every row, as one process computes them.
    for split in ("test", "last_val"):
        for key, value in single[split].items():
            assert ddp[split][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, key)
    # Expert load vectors summed over both ranks' rows.
    assert ddp["routing"] == single["routing"] and single["routing"]

    # Checkpoints and logs written once, by rank 0: the same files as one process writes.
    names = sorted(p.name for p in (ddp_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (single_dir / "checkpoints").iterdir())
    assert len(list((ddp_dir / "tb").glob("events.*"))) == len(
        list((single_dir / "tb").glob("events.*"))
    )

    # The DDP checkpoint resumes in one process: one more epoch from it equals one more
    # epoch of the single-process run.
    more = ["trainer.max_epochs=3", "resume=last", f"data.batch_size={GLOBAL_BATCH}"]
    resumed = [
        train(compose_config("train", [*RUN, *model, *more, f"output_dir={out_dir}"]))
        for out_dir in (ddp_dir, single_dir)
    ]
    # The resumed run overwrites last.ckpt (no last-v1.ckpt beside a stale one).
    assert [r["global_step"] for r in resumed] == [3 * math.ceil(3200 / GLOBAL_BATCH)] * 2
    assert [Path(r["last_ckpt"]).name for r in resumed] == ["last.ckpt"] * 2
    got, want = (_weights(Path(r["last_ckpt"])) for r in resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def _tensors(n: int) -> TabularTensors:
    return TabularTensors(
        cat_BF=torch.arange(n).unsqueeze(1), num_BF=torch.zeros(n, 0), labels_BT=torch.zeros(n, 1)
    )


@pytest.mark.parametrize("n", [3200, 3201, 3203])
def test_ranks_read_disjoint_halves_of_each_global_batch(n: int) -> None:
    rows = _tensors(n)
    one = TensorBatchLoader(tensors=rows, batch_size=GLOBAL_BATCH, shuffle=True, seed=3)
    shards = [
        TensorBatchLoader(
            tensors=rows,
            batch_size=GLOBAL_BATCH // 2,
            shuffle=True,
            seed=3,
            num_shards=2,
            shard_index=r,
        )
        for r in range(2)
    ]
    for epoch in range(2):
        for loader in (one, *shards):
            loader.set_epoch(epoch)
        read = [[b.cat[:, 0].tolist() for b in loader] for loader in shards]
        assert len(read[0]) == len(read[1])  # DDP needs the same step count on every rank
        flat = [[row for batch in r for row in batch] for r in read]
        assert not set(flat[0]) & set(flat[1])  # no row read twice within an epoch
        assert len(set(flat[0]) | set(flat[1])) == 2 * (n // 2)  # at most one row left out
        for b, batch in enumerate(one):  # global batch b = the union of the ranks' batches b
            ranks, full = sorted(read[0][b] + read[1][b]), sorted(batch.cat[:, 0].tolist())
            if b < len(one) - 1 or n % 2 == 0:
                assert ranks == full, b
            else:  # an odd row count: the last batch's odd row is left out
                assert set(ranks) < set(full) and len(ranks) == len(full) - 1


def test_datamodule_shards_train_rows_by_trainer_rank() -> None:
    from mtl.data.datamodule import RecDataModule

    flat = []
    for rank in range(2):
        dm = RecDataModule(
            source="synthetic_ctr",
            source_kwargs={"n": 2000, "n_users": 50, "n_items": 40},
            batch_size=100,
        )
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        loader = dm.train_dataloader()
        assert (loader.num_shards, loader.shard_index) == (2, rank)
        flat.append(torch.cat([b.num for b in loader]))
        # evaluation is not sharded: every rank scores every row (exact, see datamodule)
        assert dm.val_dataloader().num_rows == len(dm.tensors("val"))
    assert len(flat[0]) == len(flat[1]) == 800
    assert not torch.equal(flat[0], flat[1])


def _metric_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        probs, labels, users = _eval_rows()
        metric = BinaryTaskMetrics()
        half = slice(rank * 500, (rank + 1) * 500)
        for start in range(0, 500, 128):  # uneven batches
            part = slice(half.start + start, min(half.start + start + 128, half.stop))
            metric.update(probs[part], labels[part], users[part])
        torch.save(metric.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _eval_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    labels = (torch.rand(1000, generator=gen) < 0.3).float()
    probs = (0.3 * labels + 0.7 * torch.rand(1000, generator=gen)).clamp(0.01, 0.99)
    return probs, labels, torch.randint(0, 40, (1000,), generator=gen)


def test_auc_gauc_logloss_over_two_processes_equal_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    mp.spawn(_metric_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    probs, labels, users = _eval_rows()
    one = BinaryTaskMetrics()
    one.update(probs, labels, users)
    want = one.compute()
    half = BinaryTaskMetrics()
    half.update(probs[:500], labels[:500], users[:500])
    assert half.compute()["auc"] != pytest.approx(want["auc"])  # a rank alone differs
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(want, rel=1e-6), rank


def test_launch_rank_zero_from_environment() -> None:
    assert is_launch_rank_zero({})
    assert is_launch_rank_zero({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        assert not is_launch_rank_zero({name: "1"}), name
