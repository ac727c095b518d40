"""Adapter files are checked against the base before the model is touched."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl.data.tokenizers import CharTokenizer
from mtl.models.lm import MoEFFN, TransformerLM
from mtl.models.lm.lora import (
    LoRAConfig,
    has_lora,
    load_adapters,
    mark_only_lora_trainable,
    save_adapters,
)
from mtl.moe import SwiGLUExperts, TopKGate

CONFIG = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "experts"))
TEXT = "abcdefghijklmnopqrstuvwxyz .,;:!?'-ABCDE"
TOK = CharTokenizer.fit(TEXT)


def _lm(seed: int, d_model: int = 16) -> TransformerLM:
    torch.manual_seed(seed)
    moe = MoEFFN(
        num_experts=4, gate=partial(TopKGate, k=2), experts=partial(SwiGLUExperts, d_hidden=32)
    )
    return TransformerLM(
        vocab_size=40, d_model=d_model, n_layers=2, n_heads=2, d_ff=32, moe=moe, moe_layers=[1]
    )


def _adapted_file(
    tmp_path: Path, seed: int = 0, **save_kwargs: object
) -> tuple[Path, torch.Tensor]:
    lm = _lm(seed)
    CONFIG.apply(lm)
    mark_only_lora_trainable(lm)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    path = tmp_path / "adapters.pt"
    save_adapters(lm, path, config=CONFIG, **save_kwargs)
    return path, lm(torch.arange(8)[None]).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not has_lora(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_adapters_reload_on_their_base_with_its_tokenizer(tmp_path: Path) -> None:
    path, want = _adapted_file(tmp_path, tokenizer=TOK)
    blob = torch.load(path, weights_only=True)
    assert blob["base"]["tokenizer_fingerprint"] == TOK.fingerprint()
    base = _lm(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_adapters(base, path, tokenizer=CharTokenizer.fit(TEXT)) == CONFIG
    torch.testing.assert_close(base(torch.arange(8)[None]).logits, want, atol=0.0, rtol=0.0)


def test_another_base_of_the_same_shapes_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path, _ = _adapted_file(tmp_path, seed=0)
    other = _lm(1)
    before = _state(other)
    with pytest.raises(ValueError, match=r"adapters\.pt: .*another base: base weights hash"):
        load_adapters(other, path)
    _assert_unchanged(other, before)


def test_another_tokenizer_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    path, _ = _adapted_file(tmp_path, tokenizer=TOK)
    other_tok = CharTokenizer.fit("abcdefghijklmnopqrstuvwxyz .,;:!?'-ABCDF")  # same size
    base = _lm(0)
    before = _state(base)
    with pytest.raises(ValueError, match=rf"{TOK.fingerprint()}.*{other_tok.fingerprint()}"):
        load_adapters(base, path, tokenizer=other_tok)
    _assert_unchanged(base, before)


def test_a_base_of_other_widths_names_tensor_and_shapes(tmp_path: Path) -> None:
    path, _ = _adapted_file(tmp_path)
    wide = _lm(0, d_model=24)
    before = _state(wide)
    with pytest.raises(
        ValueError,
        match=r"adapter layers\.0\.attn\.q_proj\.lora_A has shape \(2, 16\) .* \(2, 24\)",
    ):
        load_adapters(wide, path)
    _assert_unchanged(wide, before)


def test_a_truncated_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path, _ = _adapted_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    base = _lm(0)
    before = _state(base)
    with pytest.raises(ValueError, match=rf"{path}: cannot read the adapter file"):
        load_adapters(base, path)
    _assert_unchanged(base, before)


def test_a_file_without_base_marks_loads_with_a_warning(tmp_path: Path) -> None:
    path, _ = _adapted_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    del blob["base"]  # as written before the base was recorded
    torch.save(blob, path)
    base = _lm(1)  # cannot be told apart: loads
    with pytest.warns(UserWarning, match="without the marks of its base"):
        load_adapters(base, path)
    assert has_lora(base)


def test_weights_trained_along_are_left_out_of_the_base_hash(tmp_path: Path) -> None:
    lm = _lm(0)
    CONFIG.apply(lm)
    mark_only_lora_trainable(lm, train_also=("gate.",))
    with torch.no_grad():
        lm.layers[1].ffn.gate.proj.weight.add_(1.0)  # as fine-tuning the routers would
    save_adapters(lm, tmp_path / "a.pt", config=CONFIG)
    hashed = torch.load(tmp_path / "a.pt", weights_only=True)["base"]["hashed"]
    assert hashed and not any("gate." in n for n in hashed)
    load_adapters(_lm(0), tmp_path / "a.pt")  # the untouched base is the adapters' base


def test_weights_trained_along_are_saved_and_loaded_with_the_adapters(tmp_path: Path) -> None:
    lm = _lm(0)
    CONFIG.apply(lm)
    mark_only_lora_trainable(lm, train_also=("gate.",))
    with torch.no_grad():
        lm.layers[1].ffn.gate.proj.weight.add_(1.0)  # as fine-tuning the routers would
    save_adapters(lm, tmp_path / "a.pt", config=CONFIG)
    base = _lm(0)
    load_adapters(base, tmp_path / "a.pt")
    # the loaded model is the fine-tuned one: routers included, every parameter equal
    tuned, loaded = dict(lm.named_parameters()), dict(base.named_parameters())
    assert tuned.keys() == loaded.keys()
    for name, p in tuned.items():
        torch.testing.assert_close(loaded[name], p, rtol=0, atol=0, msg=name)
