"""The run turns an upcycled LM's config node into plain arguments and reads the dense weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from mtl.data.text import TextDataModule
from mtl.models.lm.upcycled import UpcycledLM
from mtl.training.build import build_net, load_module
from mtl.training.config import ConfigError
from mtl.training.lm_module import LMModule
from mtl.training.upcycled_build import is_upcycled, upcycled_config

TARGET = "mtl.models.lm.upcycled.UpcycledLM"
DENSE_NODE = {  # conf/model/lm_dense.yaml's keys, as the composed config holds them
    "_target_": "mtl.models.lm.TransformerLM",
    "vocab_size": None,
    "max_seq_len": None,
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 32,
    "moe": None,
}
PLAIN = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}


def test_the_dense_node_becomes_plain_arguments() -> None:
    node = {"_target_": TARGET, "_recursive_": False, "dense": DENSE_NODE, "k": 2}
    once = upcycled_config(node)
    assert once == {"_target_": TARGET, "_recursive_": False, "dense": PLAIN, "k": 2}
    assert upcycled_config(once) == once
    assert node["dense"] == DENSE_NODE  # the given node is left as it was
    kept = upcycled_config({"dense": {**DENSE_NODE, "max_seq_len": 64}})["dense"]
    assert kept == {**PLAIN, "max_seq_len": 64}


@pytest.mark.parametrize(
    "dense,match",
    [
        ({**DENSE_NODE, "_target_": "torch.nn.Linear"}, "must describe a TransformerLM"),
        ({**DENSE_NODE, "moe": {"num_experts": 4}}, "moe: null"),
    ],
)
def test_a_dense_node_that_is_not_a_dense_transformer_is_refused(
    dense: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        upcycled_config({"_target_": TARGET, "dense": dense})


def test_is_upcycled_resolves_the_target() -> None:
    assert is_upcycled({"_target_": TARGET})
    assert not is_upcycled({"_target_": "mtl.models.lm.TransformerLM"})
    assert not is_upcycled({"_target_": "mtl.models.lm.NoSuchModel"})
    assert not is_upcycled({"d_model": 16})


def _data(tmp_path: Path) -> TextDataModule:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(50)]
    path = tmp_path / "t.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(600)))
    dm = TextDataModule(path=str(path), block_size=16, batch_size=4)
    dm.setup("fit")
    return dm


def test_a_missing_init_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    dm = _data(tmp_path)
    missing = tmp_path / "nope.ckpt"
    model = {"_target_": TARGET, "_recursive_": False, "dense": DENSE_NODE, "num_experts": 2}
    cfg = OmegaConf.create(
        {"kind": "lm", "model": {**model, "k": 1, "init_checkpoint": str(missing)}}
    )
    with pytest.raises(ConfigError, match=f"model.init_checkpoint not found: {missing}"):
        build_net(cfg, dm)


def test_a_checkpoint_storing_the_dense_node_with_hydra_keys_rebuilds(tmp_path: Path) -> None:
    """A stored ``net_config`` whose ``dense`` node still has ``_target_`` and null sizes."""
    dm = _data(tmp_path)
    V = dm.tokenizer.vocab_size
    torch.manual_seed(0)
    net = UpcycledLM(dense=PLAIN, vocab_size=V, max_seq_len=16, num_experts=4, k=2, noise_std=0.1)
    stored = {
        "_target_": TARGET,
        "_recursive_": False,
        "dense": DENSE_NODE,
        "vocab_size": V,
        "max_seq_len": 16,
        "num_experts": 4,
        "k": 2,
        "noise_std": 0.1,
    }
    module = LMModule(net=net, tokenizer=dm.tokenizer, net_config=stored)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    again = load_module(ckpt.last_model_path)
    assert isinstance(again.net, UpcycledLM) and sorted(again.net.moe_layers()) == [0, 1]
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    module.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, module(idx).logits)
