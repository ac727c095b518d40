"""Streaming the shards: every row once per epoch, an order fixed by (seed, epoch), disjoint
shares for DataLoader workers and DDP processes, resume, and a ranker trained on them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import torch.multiprocessing as mp

import mtl.data.shards.stream as stream_module
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.prepare import prepare
from mtl.data.shards.stream import ShardStream, plan_ranges
from mtl.data.tabular import RecBatch
from mtl.training.config import compose_config
from mtl.training.train import train

N = 2000
ROW_GROUP = 100  # 20 blocks in the train split: enough to see the block order shuffled


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    x = rng.normal(size=N)
    pl.DataFrame(
        {
            "rid": np.arange(N, dtype=np.float64),
            "ts": np.arange(N),  # a time split gives exact split sizes
            "user": rng.integers(0, 40, N),
            "item": rng.integers(0, 50, N),
            "x": x,
            "click": (x + 0.5 * rng.normal(size=N) > 0).astype(int),
            "like": rng.integers(0, 2, N),
        }
    ).write_parquet(root / "rows.parquet")
    data = {
        "path": str(root / "rows.parquet"),
        "labels": ["click", "like"],
        "categorical": ["user", "item"],
        "numeric": ["rid", "x"],
        "user": "user",
        "split_by": "ts",
        "train": None,
        "val": None,
        "test": None,
    }
    prepare(data, root / "shards", row_group_rows=ROW_GROUP, shard_rows=700, log=lambda _: None)
    return root / "shards"


def _dm(shards: Path, **kwargs: object) -> ShardsDataModule:
    dm = ShardsDataModule(path=shards, batch_size=64, buffer_rows=300, **kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _rids(dm: ShardsDataModule, batches: list[RecBatch]) -> list[int]:
    """The raw row ids of the batches' rows, in order."""
    f = dm.spec.numeric[0]
    assert f.name == "rid"
    ids = [np.rint(b.num[:, 0].numpy().astype(np.float64) * f.std + f.mean) for b in batches]
    return np.concatenate(ids).astype(int).tolist() if ids else []


def _train_rids(dm: ShardsDataModule) -> set[int]:
    return set(_rids(dm, list(dm.stream("train"))))


def test_an_epoch_is_a_function_of_seed_and_epoch(shards: Path) -> None:
    dm = _dm(shards)
    everything = _train_rids(dm)
    assert len(everything) == dm.rows("train")

    def epoch(seed: int, e: int) -> list[int]:
        s = dm.stream("train")
        s.seed, s.epoch = seed, e
        batches = list(s)
        sizes = [b.batch_size for b in batches]
        assert sizes[:-1] == [64] * (len(sizes) - 1) and len(batches) == s.num_batches()
        return _rids(dm, batches)

    first = epoch(0, 0)
    assert sorted(first) == sorted(everything)  # every train row once
    assert epoch(0, 0) == first  # same seed and epoch: same order
    assert epoch(0, 1) != first and sorted(epoch(0, 1)) == sorted(first)  # next epoch: reshuffled
    assert epoch(1, 0) != first
    # the order is mixed beyond one buffer: the first batch holds rows of several blocks,
    # and the first rows served are not the first blocks of the file
    blocks = {r // ROW_GROUP for r in first[:64]}
    assert len(blocks) >= 2
    assert first[:64] != sorted(first)[:64]


def test_eval_streams_are_in_file_order_and_complete(shards: Path) -> None:
    dm = _dm(shards)
    for split in ("val", "test"):
        rids = _rids(dm, list(dm._eval_loader(split)))
        assert rids == sorted(rids) and len(rids) == dm.rows(split)


def _worker_batches(
    dm: ShardsDataModule, *, rank: int, world: int, workers: int
) -> list[list[int]]:
    """The rows each simulated DataLoader worker of one process serves."""
    out = []
    for w in range(workers):
        info = SimpleNamespace(id=w, num_workers=workers)
        original = stream_module.get_worker_info
        stream_module.get_worker_info = lambda info=info: info  # type: ignore[assignment]
        try:
            out.append(_rids(dm, list(dm.stream("train", rank=rank, world=world))))
        finally:
            stream_module.get_worker_info = original
    return out


def test_workers_and_ranks_read_disjoint_rows_covering_every_row_once(shards: Path) -> None:
    dm = _dm(shards)
    everything = _train_rids(dm)
    shares = [
        rows for rank in range(2) for rows in _worker_batches(dm, rank=rank, world=2, workers=2)
    ]
    flat = [r for share in shares for r in share]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == everything  # 1600 rows: divisible by 2, nothing left out
    # each process reads its own blocks: the blocks of rank 0 and rank 1 barely overlap
    by_rank = [{r // ROW_GROUP for s in shares[2 * k : 2 * k + 2] for r in s} for k in range(2)]
    assert len(by_rank[0] & by_rank[1]) <= 1


def test_ranks_serve_equal_batch_counts_for_ddp() -> None:
    blocks = [stream_module.Block("a", i * 10, 10) for i in range(7)] + [
        stream_module.Block("b", 0, 3)
    ]  # 73 rows: 2 ranks of 36, one row left out
    ranges = [plan_ranges(blocks, seed=0, epoch=0, shuffle=True, rank=r, world=2) for r in (0, 1)]
    counts = [sum(hi - lo for _, lo, hi in pieces) for pieces in ranges]
    assert counts == [36, 36]
    s = [
        ShardStream(
            blocks=blocks,
            columns=stream_module.ShardColumns([], [], []),
            batch_size=8,
            rank=r,
            world=2,
        )
        for r in (0, 1)
    ]
    assert s[0].num_batches(workers=3) == s[1].num_batches(workers=3) == 6  # 12 rows per worker


@pytest.mark.slow  # worker processes start with "spawn": seconds each
def test_two_dataloader_worker_processes_cover_every_row_once(shards: Path) -> None:
    dm = _dm(shards, num_workers=2)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    rids = _rids(dm, batches)
    assert len(rids) == len(set(rids)) and set(rids) == _train_rids(dm)
    # the same rows in the same order as the simulated workers, interleaved batch by batch
    assert sorted(rids) == sorted(
        r for s in _worker_batches(dm, rank=0, world=1, workers=2) for r in s
    )


def test_resume_mid_epoch_serves_the_remaining_batches(shards: Path) -> None:
    dm = _dm(shards)
    full = dm.train_dataloader()
    full.set_epoch(3)
    expected = _rids(dm, list(full))
    first = dm.train_dataloader()
    first.set_epoch(3)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_served": 5}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _rids(dm, head) + _rids(dm, rest) == expected
    # a finished epoch resumes at the next one
    done = dm.train_dataloader()
    done.load_state_dict({"epoch": 3, "batches_served": len(done)})
    assert done._epoch == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_rank(rank: int, world: int, port: int, shards: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        dm = _dm(Path(shards))
        loader = dm.train_dataloader()  # rank and world from torch.distributed
        rids = torch.tensor(_rids(dm, list(loader)))
        n = torch.tensor([len(loader)])
        gathered = [torch.zeros_like(rids) for _ in range(world)]
        torch.distributed.all_gather(gathered, rids)
        counts = [torch.zeros_like(n) for _ in range(world)]
        torch.distributed.all_gather(counts, n)
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {"rows": [g.tolist() for g in gathered], "batches": [int(c) for c in counts]}
                )
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_gloo_processes_read_disjoint_shares(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "gathered.json"
    mp.spawn(_gloo_rank, args=(2, _free_port(), str(shards), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    dm = _dm(shards)
    assert got["batches"][0] == got["batches"][1]  # DDP needs equal step counts
    expected = [_rids(dm, list(dm.stream("train", rank=r, world=2))) for r in (0, 1)]
    assert got["rows"] == expected  # each process read what the single-process plan says
    assert set(got["rows"][0]).isdisjoint(got["rows"][1])
    assert set(got["rows"][0]) | set(got["rows"][1]) == _train_rids(dm)


def test_mmoe_trains_on_shards_and_records_the_data(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "data=shards",
            f"data.path={shards}",
            "data.batch_size=128",
            "data.buffer_rows=500",
            "model=mmoe",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            f"output_dir={out}",
        ],
    )
    result = train(cfg)
    dm = _dm(shards)
    assert result["global_step"] == 2 * 13  # ceil(1600 / 128) steps per epoch
    assert result["split"]["rows"] == {"train": 1600, "val": 200, "test": 200}
    assert result["split"]["how"] == dm.split_how()
    assert "by time on 'ts'" in result["split"]["how"]
    assert result["split"]["positive_rate"] == dm.manifest["positive_rate"]
    assert result["split"]["files"]["shards"] == [str(shards)]
    # click follows x: the ranker learnt it from the streamed rows
    assert result["test"]["auc/click"] > 0.75
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["split"]["rows"]["test"] == 200
