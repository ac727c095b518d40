"""Exporting to a transformers checkpoint writes the weights as they are and copies each once.

The reference for the file's contents is transformers' own ``save_pretrained``
file of the same model; the copy count is every tensor storage torch allocates
during :func:`save_hf_checkpoint`, seen by a dispatch mode under which the
export runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mtl.models.lm.hf import load_hf_checkpoint, save_hf_checkpoint
from mtl.models.lm.hf.mixtral import ARCH as MIXTRAL
from mtl.models.lm.hf.spec import HFConfig
from mtl.models.lm.hf.weights import file_tensors

try:
    import transformers  # noqa: F401  (tiny_hf_model needs it)
except ImportError:  # pragma: no cover - the [hf] extra is missing
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("transformers is not installed (pip install '.[hf]')", allow_module_level=True)


class NewStorageBytes(TorchDispatchMode):
    """Sum of the bytes of every tensor storage an op creates (views and in-place ops create none)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _mixtral_lm(*, d_model: int = 32, d_hidden: int = 256, experts: int = 8) -> Any:
    """A 2-layer Mixtral-shaped LM whose experts are most of its bytes."""
    cfg = HFConfig(
        {
            "model_type": "mixtral",
            "vocab_size": 16,
            "hidden_size": d_model,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": d_hidden,
            "num_local_experts": experts,
            "num_experts_per_tok": 2,
            "rope_theta": 1e4,
        }
    )
    lm = MIXTRAL.build(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    return lm


def _nbytes(lm: Any, *, experts: bool, dtype: torch.dtype = torch.float32) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(
        p.numel() * item for k, p in lm.state_dict().items() if (".experts." in k) == experts
    )


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_export_file_equals_transformers_file_bitwise(arch: str, tmp_path: Path) -> None:
    """Loaded and written again, every tensor of transformers' file comes back bit for bit."""
    from safetensors.torch import load_file

    from mtl.models.lm.hf.tiny import tiny_hf_model

    tiny_hf_model(arch, seed=5).save_pretrained(tmp_path / "hf")
    out = save_hf_checkpoint(load_hf_checkpoint(tmp_path / "hf"), tmp_path / "mtl", model_type=arch)
    theirs = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], t), name


def test_export_copies_the_expert_weights_once(tmp_path: Path) -> None:
    """A float32 export allocates the expert bytes once (their transposes) and nothing else."""
    lm = _mixtral_lm()
    expert_bytes = _nbytes(lm, experts=True)
    assert expert_bytes > 10 * _nbytes(lm, experts=False)  # the experts dominate
    with NewStorageBytes() as counted:
        save_hf_checkpoint(lm, tmp_path, model_type="mixtral")
    assert expert_bytes <= counted.bytes <= expert_bytes + 4096


def test_bfloat16_export_converts_each_tensor_once(tmp_path: Path) -> None:
    """A bfloat16 LM is written as float32: one converting copy of every tensor."""
    lm = _mixtral_lm().to(torch.bfloat16)
    f32_bytes = _nbytes(lm, experts=True) + _nbytes(lm, experts=False)
    with NewStorageBytes() as counted:
        save_hf_checkpoint(lm, tmp_path, model_type="mixtral")
    assert f32_bytes <= counted.bytes <= f32_bytes + 4096
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "model.safetensors"))[
        "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    ]
    assert torch.equal(w1, lm.layers[1].ffn.experts.w_gate[3].T.float())


def test_new_storage_bytes_sees_copies_and_not_views() -> None:
    """Control for the counter: a transpose is free, ``contiguous`` then ``clone`` is two copies."""
    w = torch.randn(64, 32)
    with NewStorageBytes() as counted:
        w.T.unbind(0)
    assert counted.bytes == 0
    with NewStorageBytes() as counted:
        w.T.contiguous().clone()
    assert counted.bytes == 2 * w.numel() * w.element_size()


def test_file_tensors_shares_no_memory_between_entries(tmp_path: Path) -> None:
    """Contiguous float32 tensors pass through; a second name for the same memory gets a copy
    (safetensors refuses to write two tensors sharing memory)."""
    from safetensors.torch import load_file, save_file

    w = torch.randn(3, 4)
    out = file_tensors({"a": w, "b": w, "c": w.T, "d": w.double()})
    assert out["a"].data_ptr() == w.data_ptr()
    assert out["b"].data_ptr() != w.data_ptr()
    assert out["d"].dtype == torch.float32
    save_file(out, str(tmp_path / "x.safetensors"))
    back = load_file(str(tmp_path / "x.safetensors"))
    for name, ref in (("a", w), ("b", w), ("c", w.T), ("d", w)):
        assert torch.equal(back[name], ref), name
