"""A checkpoint of an LM built or changed in Python (upcycled) reloads with ``load_module(path, net=)``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from mtl.data.text import TextDataModule
from mtl.models.lm import TransformerLM, copy_ffn, upcycle_transformer
from mtl.training.build import build_lm, load_module
from mtl.training.checkpoints import CheckpointError
from mtl.training.lm_module import LMModule

DENSE = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 32,
    "max_seq_len": 16,
}


def _upcycled(vocab_size: int, seed: int) -> TransformerLM:
    """A dense LM from its config, both FFNs upcycled to 4 noisy copies, top-2."""
    torch.manual_seed(seed)
    lm = build_lm(DENSE, vocab_size=vocab_size)
    upcycle_transformer(
        lm, make_moe=lambda ffn, i: copy_ffn(ffn, num_experts=4, k=2, noise_std=0.1, seed=i)
    )
    return lm


def _text(path: Path) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(50)]
    path.write_text(" ".join(rng.choice(words) for _ in range(600)))
    return path


@pytest.mark.parametrize("saved_config", ["none", "dense"])
def test_upcycled_lm_checkpoint_reloads_with_identical_logits(
    tmp_path: Path, saved_config: str
) -> None:
    dm = TextDataModule(path=str(_text(tmp_path / "t.txt")), block_size=16, batch_size=4)
    dm.setup("fit")
    V = dm.tokenizer.vocab_size
    # "none": the net was built in Python; "dense": the config of the net before upcycling
    net_config: dict[str, Any] | None = (
        None if saved_config == "none" else {**DENSE, "vocab_size": V}
    )
    module = LMModule(net=_upcycled(V, seed=0), tokenizer=dm.tokenizer, net_config=net_config)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        limit_val_batches=0,
    ).fit(module, datamodule=dm)

    # the file alone cannot rebuild the upcycled network: a one-line error says what to do
    with pytest.raises((ValueError, CheckpointError), match=r"net_config|net="):
        load_module(ckpt.last_model_path)

    # a network of the same structure (other weights) receives the checkpoint's weights
    again = load_module(ckpt.last_model_path, net=_upcycled(V, seed=1))
    assert isinstance(again, LMModule) and sorted(again.net.moe_layers()) == [0, 1]
    assert again.tokenizer is not None
    assert again.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    module.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, module(idx).logits)


def _fit(module: LMModule, dm: TextDataModule, dirpath: Path, steps: int) -> str:
    ckpt = ModelCheckpoint(dirpath=dirpath, save_last=True)
    pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    return ckpt.last_model_path


def test_upcycled_run_from_its_config_reloads_without_the_dense_checkpoint(
    tmp_path: Path,
) -> None:
    """conf/model/lm_upcycled.yaml's path: dense run -> upcycled from its checkpoint -> reload."""
    from omegaconf import OmegaConf

    from mtl.training.build import build_net

    dm = TextDataModule(path=str(_text(tmp_path / "t.txt")), block_size=16, batch_size=4)
    dm.setup("fit")
    V = dm.tokenizer.vocab_size
    torch.manual_seed(0)
    dense_config = {**DENSE, "vocab_size": V}
    dense = LMModule(
        net=build_lm(DENSE, vocab_size=V), tokenizer=dm.tokenizer, net_config=dense_config
    )
    dense_path = _fit(dense, dm, tmp_path / "dense", steps=5)

    cfg = OmegaConf.create(
        {
            "kind": "lm",
            "model": {
                "_target_": "mtl.models.lm.upcycled.UpcycledLM",
                "_recursive_": False,
                "dense": DENSE,
                "vocab_size": None,
                "max_seq_len": None,
                "method": "copy",
                "num_experts": 4,
                "k": 2,
                "init_checkpoint": dense_path,
                "freeze": "all_but_experts",
            },
        }
    )
    net, net_config = build_net(cfg, dm)
    assert "init_checkpoint" not in net_config  # the weights are the checkpoint's own
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    dense.eval()
    net.eval()
    with torch.no_grad():  # copy-upcycled, renormalised top-2: the dense function
        torch.testing.assert_close(net(idx).logits, dense(idx).logits, atol=1e-5, rtol=1e-5)
    assert net.moe_layers()[0].gate.proj.weight.requires_grad
    assert not net.embed.weight.requires_grad

    module = LMModule(net=net, tokenizer=dm.tokenizer, net_config=net_config)
    path = _fit(module, dm, tmp_path / "up", steps=3)
    Path(dense_path).unlink()  # the reload needs only its own file
    again = load_module(path)
    assert sorted(again.net.moe_layers()) == [0, 1]
    module.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, module(idx).logits)
