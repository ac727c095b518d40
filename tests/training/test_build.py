"""Every model config composes, builds through its _target_ and trains one fast_dev_run step;
checkpoints rebuild their network from the stored config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mtl.models.lm import TransformerLM
from mtl.models.rec import Ranker
from mtl.training.build import build_datamodule, build_module, load_module
from mtl.training.config import available, compose_config
from mtl.training.lm_module import LMModule
from mtl.training.rec_module import RecModule
from mtl.training.train import train

MODELS = available("model")
TINY_REC = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=50",
    "data.source_kwargs.n_items=30",
    "data.batch_size=256",
]
TINY_LM = ["data.block_size=32", "data.batch_size=4", "generate.max_new_tokens=5"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(name: str) -> list[str]:
    if name.startswith("lm_"):
        groups = ["model.moe.group_size=4"] if name == "lm_mot" else []  # batches of whole groups
        return [f"experiment={name}", *TINY_LM, *groups]
    tasks = ["data.source_kwargs.tasks=[ctr,ctcvr]"] if name == "esmm" else []
    return [f"model={name}", *TINY_REC, *tasks]


def test_configs_cover_both_kinds() -> None:
    assert {"mmoe", "home", "esmm", "lm_mixtral", "lm_dense"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_trains_a_fast_dev_run_step(name: str, tmp_path: Path) -> None:
    overrides = [*_overrides(name), "trainer.enable_progress_bar=false", "+trainer.fast_dev_run=1"]
    cfg = compose_config("train", [*overrides, f"output_dir={tmp_path}"])
    result = train(cfg)
    assert result["model"] == name and result["global_step"] == 1
    if name.startswith("lm_"):
        assert result["kind"] == "lm" and result["val_loss"] > 0.0
        assert result["val_loss"] == pytest.approx(float(torch.tensor(result["val_ppl"]).log()))
        assert result["params"]["active"] <= result["params"]["total"]
    else:
        assert result["kind"] == "rec" and result["test"]
        assert all(0.0 <= v <= 1.0 for k, v in result["test"].items() if k.startswith("auc/"))


@pytest.mark.parametrize("name", ["mmoe", "lm_deepseekmoe"])
def test_module_receives_the_built_net_and_keeps_its_config(name: str) -> None:
    cfg = compose_config("train", _overrides(name))
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    config = module.hparams["net_config"]
    if name == "mmoe":
        assert isinstance(module, RecModule) and isinstance(module.net, Ranker)
        assert config["model"]["_target_"] == "mtl.models.rec.MMoE"
        assert config["model"]["d_in"] == module.net.embedding.output_dim
        assert config["model"]["tasks"] == ["click", "like", "conversion"]
    else:
        assert isinstance(module, LMModule) and isinstance(module.net, TransformerLM)
        assert config["vocab_size"] == dm.vocab_size and config["max_seq_len"] == 32
        layers = module.net.moe_layers()
        assert sorted(layers) == [1, 2, 3]  # first layer dense, as in the preset
        assert layers[1].experts is not layers[2].experts  # one fresh MoE layer per block
        assert layers[1].num_experts == 30 and layers[1].shared.num_experts == 2


def test_checkpoint_rebuilds_its_ranker(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *_overrides("ple"),
            "model.expert_hidden=[8]",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"output_dir={tmp_path}",
        ],
    )
    result = train(cfg)
    module = load_module(result["best_ckpt"])
    assert isinstance(module, RecModule) and type(module.net.model).__name__ == "PLE"
    saved = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
