"""Per-expert load vectors: summed over ranks (two gloo processes against one), recorded in
``metrics.json`` and drawn in TensorBoard for ranker and LM runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from mtl.training.expert_load import ExpertLoad, log_load_histograms

LAYERS = {0: 6, 2: 4}  # layer index -> experts


def _batches() -> list[dict[int, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        {i: torch.randint(0, 50, (E,), generator=gen).float() for i, E in LAYERS.items()}
        for _ in range(6)
    ]


def _load_of(batches: list[dict[int, Tensor]], reduce_sum: Any = None) -> dict[str, list[float]]:
    load = ExpertLoad()
    for b in batches:
        load.add(b)
    if reduce_sum is not None:
        load.reduce(reduce_sum)
    return load.as_dict("val/moe/")


def _all_reduce_sum(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        batches = _batches()
        mine = batches[rank::world_size]
        torch.save(_load_of(mine, _all_reduce_sum), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_load_summed_over_two_gloo_processes_equals_one_process(tmp_path: Path) -> None:
    world_size = 2
    mp.start_processes(
        _worker,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    want = _load_of(_batches())
    by_hand = {i: sum(b[i] for b in _batches()) for i in LAYERS}
    assert want == {f"val/moe/layer{i}/tokens_per_expert": v.tolist() for i, v in by_hand.items()}
    for rank in range(world_size):
        assert torch.load(tmp_path / f"rank{rank}.pt") == want  # every rank holds the total


def _events(tb_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tb_dir}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    return acc


def _check_histogram(acc: Any, tag: str, load: list[float]) -> None:
    assert f"{tag}/bars" in acc.Tags()["images"]
    last = acc.Histograms(tag)[-1].histogram_value
    assert list(last.bucket) == pytest.approx(load)
    assert list(last.bucket_limit) == pytest.approx(list(range(len(load))))


def test_log_load_histograms_skips_other_loggers_and_writes_tensorboard(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    loads = {"val/moe/layer0/tokens_per_expert": [3.0, 0.0, 5.0, 8.0]}
    written = log_load_histograms([CSVLogger(str(tmp_path)), tb], loads, step=7)
    tb.experiment.flush()
    assert written == 1
    _check_histogram(
        _events(tmp_path / "tb"),
        "val/moe/layer0/tokens_per_expert",
        loads["val/moe/layer0/tokens_per_expert"],
    )


def test_log_load_histograms_leaves_the_matplotlib_backend_and_pyplot_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib
    import matplotlib.pyplot as plt
    from pytorch_lightning.loggers import TensorBoardLogger

    def no_switch(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("log_load_histograms switched the process-wide matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", no_switch)
    open_before = plt.get_fignums()
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    loads = {"val/moe/layer0/tokens_per_expert": [1.0, 2.0]}
    assert log_load_histograms([tb], loads, step=1) == 1
    tb.experiment.flush()
    assert plt.get_fignums() == open_before  # no figure registered with pyplot
    assert "val/moe/layer0/tokens_per_expert/bars" in _events(tmp_path / "tb").Tags()["images"]


def test_rec_run_records_the_load_in_metrics_json_and_tensorboard(tmp_path: Path) -> None:
    from mtl.training.config import compose_config
    from mtl.training.train import train

    out = tmp_path / "run"
    tasks = 3
    result = train(
        compose_config(
            "train",
            [
                "model=ple",
                "model.gate=top_k",
                "model.gate.k=2",
                "model.num_levels=2",
                "model.num_shared_experts=2",
                "model.num_task_experts=2",
                "model.expert_hidden=[8]",
                "model.tower_hidden=[4]",
                "data.source_kwargs.n=3000",
                "data.source_kwargs.n_users=50",
                "data.source_kwargs.n_items=50",
                "data.batch_size=512",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "num_threads=1",
                f"output_dir={out}",
            ],
        )
    )
    saved = json.loads((out / "metrics.json").read_text())
    routing = saved["routing"]
    assert routing == result["routing"]
    E = 2 + 2 * tasks
    for split in ("val", "test"):
        level0 = routing[f"{split}/moe/layer0/tokens_per_expert"]
        level1 = routing[f"{split}/moe/layer1/tokens_per_expert"]
        assert len(level0) == len(level1) == E
        # level 0: every task's gate and the shared gate choose 2 experts per row;
        # level 1 (the last) has no shared gate
        assert sum(level0) / (2 * (tasks + 1)) == sum(level1) / (2 * tasks)
        rows = sum(level1) / (2 * tasks)
        assert rows == int(rows) and rows > 0
    test_rows = saved["split"]["rows"]["test"]
    assert sum(routing["test/moe/layer1/tokens_per_expert"]) == 2 * tasks * test_rows
    acc = _events(out / "tb")
    for split in ("val", "test"):
        for level in (0, 1):
            tag = f"{split}/moe/layer{level}/tokens_per_expert"
            _check_histogram(acc, tag, routing[tag])


def test_lm_run_draws_the_load_in_tensorboard(tmp_path: Path) -> None:
    from mtl.training.config import compose_config
    from mtl.training.train import train

    torch.set_num_threads(1)
    result = train(
        compose_config(
            "train",
            [
                "experiment=lm_mixtral",
                "model.n_layers=2",
                "data.block_size=32",
                "data.batch_size=8",
                "trainer.max_steps=2",
                "data.steps_per_epoch=50",
                "trainer.limit_val_batches=1",
                "trainer.enable_progress_bar=false",
                "generate.max_new_tokens=4",
                f"output_dir={tmp_path}",
            ],
        )
    )
    loads = {k: v for k, v in result["routing"].items() if k.endswith("/tokens_per_expert")}
    assert len(loads) == 2
    acc = _events(tmp_path / "tb")
    for tag, load in loads.items():
        _check_histogram(acc, tag, load)
