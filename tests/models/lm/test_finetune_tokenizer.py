"""Fine-tuning entry points (LoRA's ``model.checkpoint``, upcycling's ``init_checkpoint``)
refuse a checkpoint trained with another tokenizer, even one of the same size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from mtl.data.text import TextDataModule
from mtl.data.tokenizers import CharTokenizer
from mtl.training.build import build_lm, build_net
from mtl.training.config import ConfigError
from mtl.training.lm_module import LMModule, VocabularyMismatchError

DENSE = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 32,
    "max_seq_len": 16,
}
CHARS = "abcdefgh "
OTHER_CHARS = "abcdefxy "  # the same size; "g" and "h" are other symbols (ids 6, 7)
TEXT = "abc def fed cba " * 60


def _data(tmp_path: Path, chars: str) -> TextDataModule:
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    dm = TextDataModule(
        path=str(path), tokenizer=CharTokenizer(chars=chars), block_size=16, batch_size=4
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A dense run of one step on the ``CHARS`` tokenizer."""
    tmp = tmp_path_factory.mktemp("base")
    dm = _data(tmp, CHARS)
    torch.manual_seed(0)
    V = dm.tokenizer.vocab_size
    module = LMModule(
        net=build_lm(DENSE, vocab_size=V),
        tokenizer=dm.tokenizer,
        net_config={**DENSE, "vocab_size": V},
    )
    ckpt = ModelCheckpoint(dirpath=tmp, save_last=True)
    pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    return ckpt.last_model_path


def _lora(path: str) -> dict[str, Any]:
    return {
        "_target_": "mtl.models.lm.lora.LoRAConfig.lm_from_checkpoint",
        "checkpoint": path,
        "rank": 2,
        "targets": ["q_proj"],
        "vocab_size": None,
        "max_seq_len": None,
    }


def _upcycled(path: str) -> dict[str, Any]:
    return {
        "_target_": "mtl.models.lm.upcycled.UpcycledLM",
        "_recursive_": False,
        "dense": DENSE,
        "vocab_size": None,
        "max_seq_len": None,
        "num_experts": 2,
        "k": 1,
        "init_checkpoint": path,
    }


def _causes(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` was raised from, nearest first."""
    chain = []
    while exc.__cause__ is not None:
        exc = exc.__cause__
        chain.append(exc)
    return chain


@pytest.mark.parametrize(
    "model,key", [(_lora, "model.checkpoint"), (_upcycled, "model.init_checkpoint")]
)
def test_a_same_size_tokenizer_with_other_ids_is_refused(
    tmp_path: Path, base_checkpoint: str, model: Any, key: str
) -> None:
    other = _data(tmp_path, OTHER_CHARS)
    same = _data(tmp_path, CHARS)
    assert other.vocab_size == same.vocab_size
    assert other.tokenizer.fingerprint() != same.tokenizer.fingerprint()
    cfg = OmegaConf.create({"kind": "lm", "model": model(base_checkpoint)})
    with pytest.raises(ConfigError, match=f"{key}: .* another tokenizer") as refused:
        build_net(cfg, other)
    assert any(isinstance(e, VocabularyMismatchError) for e in _causes(refused.value))
    assert "fingerprint" in str(refused.value) and "cannot resume" not in str(refused.value)
    net, net_config = build_net(cfg, same)  # the checkpoint's own tokenizer is accepted
    assert net.vocab_size == same.vocab_size and "tokenizer" not in net_config
