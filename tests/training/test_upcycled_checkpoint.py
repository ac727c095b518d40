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
