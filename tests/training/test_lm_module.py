"""LMModule: logging, checkpoints with the tokenizer, resume checks, aux-free bias callback."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from mtl.data.text import TextDataModule
from mtl.data.tokenizers import CharTokenizer
from mtl.moe import SigmoidBiasGate
from mtl.training.build import build_lm, load_module
from mtl.training.lm_module import AuxFreeBiasUpdate, LMModule, VocabularyMismatchError

MOE = {
    "_target_": "mtl.models.lm.MoEFFN",
    "num_experts": 4,
    "gate": {"_target_": "mtl.moe.TopKGate", "_partial_": True, "k": 2, "renormalize": True},
    "experts": {"_target_": "mtl.moe.SwiGLUExperts", "_partial_": True, "d_hidden": 32},
    "aux_loss_weights": {"load_balance": 0.01, "z_loss": 0.001},
}
MODEL = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 64,
    "max_seq_len": 16,
    "moe": MOE,
}


def _module(tokenizer: CharTokenizer, model: dict[str, Any] = MODEL, **kw: Any) -> LMModule:
    """An LMModule as train() builds it: the net and the config that rebuilds it."""
    config = {**model, "vocab_size": tokenizer.vocab_size}
    net = build_lm(config, vocab_size=tokenizer.vocab_size)
    return LMModule(net=net, tokenizer=tokenizer, net_config=config, **kw)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text_file(path: Path, alphabet: str, n: int = 4000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(200)]
    text = " ".join(rng.choice(words) for _ in range(n // 4))
    path.write_text("\n".join(text[i : i + 60] for i in range(0, len(text), 60)))
    return path


def _dm(path: Path, **kw: Any) -> TextDataModule:
    dm = TextDataModule(path=str(path), block_size=16, batch_size=4, steps_per_epoch=50, **kw)
    dm.setup("fit")
    return dm


def _trainer(
    root: Path, steps: int, callbacks: list[pl.Callback] | None = None, **kw: Any
) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 2,
        "val_check_interval": steps,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
        "callbacks": callbacks or [],
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
    }
    return pl.Trainer(**{**settings, **kw})


def test_fit_logs_losses_throughput_and_routing(tmp_path: Path) -> None:
    dm = _dm(_text_file(tmp_path / "a.txt", "abcdefgh"))
    module = _module(dm.tokenizer)
    trainer = _trainer(tmp_path, 6)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/ppl",
        "train/aux_loss",
        "train/aux/load_balance",
        "train/aux/z_loss",
        "train/tokens_per_s",
        "val/loss",
        "val/ppl",
        "moe/layer0/load_max_over_mean",
        "moe/layer1/dropped_fraction",
        "moe/layer1/router_entropy",
        "val/moe/layer0/load_max_over_mean",
    ):
        assert key in metrics, key
    assert torch.isclose(metrics["val/ppl"], metrics["val/loss"].exp())
    assert metrics["train/tokens_per_s"] > 0
    assert 1.0 <= metrics["moe/layer0/load_max_over_mean"] <= 4.0


def test_fit_logs_step_values_only_where_logger_or_last_step_reads_them(
    tmp_path: Path, count_log_calls: Any
) -> None:
    dm = _dm(_text_file(tmp_path / "a.txt", "abcdefgh"))
    module = _module(dm.tokenizer)
    train_ce: list[float] = []
    forward = module.net.forward

    def recording(idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> Any:
        out = forward(idx_BT, targets_BT)
        if module.training:
            train_ce.append(float(out.loss))
        return out

    module.net.forward = recording  # type: ignore[method-assign]
    calls = count_log_calls(module)
    trainer = _trainer(
        tmp_path, 10, log_every_n_steps=4, logger=CSVLogger(tmp_path), limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    assert len(train_ce) == 10
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    written = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(written) == [3, 7]  # Lightning writes step metrics every 4 steps
    for step, value in written.items():
        assert abs(value - train_ce[step]) < 1e-5
    # the run's last step is logged too: train() reports it as the final train loss
    assert abs(float(trainer.callback_metrics["train/loss"]) - train_ce[-1]) < 1e-5
    assert calls.count("train/loss") == 3 and calls.count("train/tokens_per_s") == 3


def test_model_and_tokenizer_vocab_must_agree() -> None:
    tok = CharTokenizer.fit("abc")
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        LMModule(net=build_lm(MODEL, vocab_size=7), tokenizer=tok)


def test_checkpoint_stores_tokenizer_and_reloads(tmp_path: Path) -> None:
    dm = _dm(_text_file(tmp_path / "a.txt", "abcdefgh"))
    module = _module(dm.tokenizer)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 3, [ckpt]).fit(module, datamodule=dm)
    raw = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)
    assert raw["lm_tokenizer"]["fingerprint"] == dm.tokenizer.fingerprint()
    assert raw["lm_tokenizer"]["state"] == dm.tokenizer.state_dict()
    again = load_module(ckpt.last_model_path)
    assert isinstance(again, LMModule) and (
        again.tokenizer is not None and again.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    )
    for (name, p), q in zip(
        module.net.state_dict().items(), again.net.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    text = again.generate("abc", max_new_tokens=8, temperature=0.0)
    assert text.startswith("abc") and len(text) == 11
    assert again.generate("", max_new_tokens=4, seed=1) == again.generate(
        "", max_new_tokens=4, seed=1
    )


@pytest.mark.parametrize("other_alphabet", ["abcdefgz", "abcdefghij"])  # same size / another size
def test_resume_with_another_vocabulary_raises(tmp_path: Path, other_alphabet: str) -> None:
    dm = _dm(_text_file(tmp_path / "a.txt", "abcdefgh"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 2, [ckpt]).fit(_module(dm.tokenizer), datamodule=dm)

    other = _dm(_text_file(tmp_path / "b.txt", other_alphabet))
    assert other.tokenizer.fingerprint() != dm.tokenizer.fingerprint()
    module = _module(other.tokenizer)
    with pytest.raises(VocabularyMismatchError, match="vocabulary mismatch") as info:
        _trainer(tmp_path, 4).fit(module, datamodule=other, ckpt_path=ckpt.last_model_path)
    assert f"vocab_size={dm.tokenizer.vocab_size}" in str(info.value)

    # the same vocabulary resumes fine and continues counting steps
    same = _dm(tmp_path / "a.txt")
    trainer = _trainer(tmp_path, 4)
    trainer.fit(
        _module(same.tokenizer),
        datamodule=same,
        ckpt_path=ckpt.last_model_path,
    )
    assert trainer.global_step == 4


def _v3_module(tokenizer: CharTokenizer, rate: float) -> LMModule:
    moe = {
        "_target_": "mtl.models.lm.MoEFFN",
        "num_experts": 8,
        "gate": {
            "_target_": "mtl.moe.SigmoidBiasGate",
            "_partial_": True,
            "k": 2,
            "bias_update_rate": rate,
        },
        "experts": {"_target_": "mtl.moe.SwiGLUExperts", "_partial_": True, "d_hidden": 16},
    }
    cfg = {**MODEL, "n_layers": 1, "moe": moe}
    torch.manual_seed(0)
    adamw = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    module = _module(tokenizer, cfg, optimizer=adamw)
    gate = module.net.moe_layers()[0].gate
    assert isinstance(gate, SigmoidBiasGate)
    with torch.no_grad():  # start badly unbalanced: experts 0 and 1 take (almost) everything
        gate.expert_bias_E.copy_(torch.tensor([0.1, 0.1, 0, 0, 0, 0, 0, 0]))
    return module


def _load_ratio(module: LMModule, x: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        stats = module(x).layer_stats[0]
    return float(stats.as_dict()["load_max_over_mean"])


def test_aux_free_bias_callback_balances_load(tmp_path: Path, shakespeare_path: Path) -> None:
    text = shakespeare_path.read_text()[:60_000]
    (tmp_path / "s.txt").write_text(text)
    dm = _dm(tmp_path / "s.txt", seed=1)
    x = dm.tokens("val")[: 16 * 32].view(32, 16)
    ratios = {}
    for use_callback in (False, True):
        module = _v3_module(dm.tokenizer, rate=0.002)
        start = _load_ratio(module, x)
        callbacks: list[pl.Callback] = [AuxFreeBiasUpdate()] if use_callback else []
        _trainer(tmp_path, 80, callbacks, limit_val_batches=0).fit(module, datamodule=dm)
        ratios[use_callback] = (start, _load_ratio(module, x))
        bias = module.net.moe_layers()[0].gate.expert_bias_E
        assert bias.sum().item() == pytest.approx(0.2, abs=1e-4)  # updates are centred
        assert torch.equal(bias[:2], torch.full((2,), 0.1)) != use_callback
    assert ratios[False][0] > 3.5 and ratios[True][0] > 3.5  # E/k = 4: two experts take all
    assert ratios[False][1] > 3.0  # without the callback the imbalance stays
    assert ratios[True][1] < 2.5  # with it, load moves toward balance (1.0)


def test_aux_free_bias_updates_every_step_and_logs_on_due_steps(
    tmp_path: Path, count_log_calls: Any
) -> None:
    dm = _dm(_text_file(tmp_path / "a.txt", "abcdefgh"))
    module = _v3_module(dm.tokenizer, rate=0.002)
    gate = module.net.moe_layers()[0].gate
    updates: list[int] = []
    update_bias = gate.update_bias

    def counting_update(counts_E: torch.Tensor) -> None:
        updates.append(1)
        update_bias(counts_E)

    gate.update_bias = counting_update  # type: ignore[method-assign]
    calls = count_log_calls(module)
    trainer = _trainer(
        tmp_path, 10, [AuxFreeBiasUpdate()], log_every_n_steps=4, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    assert len(updates) == 10  # the balancing itself never skips a step
    # logged where Lightning's logger writes (steps 3 and 7) and at the last step
    assert calls.count("moe/layer0/bias_absmax") == 3
