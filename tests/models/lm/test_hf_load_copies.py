"""Loading a transformers checkpoint puts the file's tensors in the model as they are, copying each once.

The reference for the weights is the safetensors file itself, read whole with
``load_file`` and compared with the loaded model's parameters under
transformers' names (:func:`hf_state`, the export's view of them). Two counts
of the memory loading needs: every tensor storage torch allocates during
:func:`load_hf_checkpoint` (a dispatch mode), and the peak resident memory
(``VmHWM``) of a fresh process that loads a checkpoint whose experts are most
of its bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl.models.lm.hf import load_hf_checkpoint, moe_layer_from_hf_block
from mtl.models.lm.hf.checkpoint import architecture
from mtl.models.lm.hf.weights import hf_state
from tests.models.lm.test_hf_export_copies import NewStorageBytes

try:
    import transformers
except ImportError:  # pragma: no cover - the [hf] extra is missing
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("transformers is not installed (pip install '.[hf]')", allow_module_level=True)

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"]
REPO = Path(__file__).resolve().parents[3]


def _file(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _loaded_as_file(lm: Any, model_type: str) -> dict[str, torch.Tensor]:
    """The loaded LM's parameters under the file's names and layouts (views, no copy)."""
    return hf_state(lm, architecture(model_type))


def _save_mixtral(directory: Path, *, d_model: int, d_hidden: int, experts: int) -> Path:
    """A 2-layer Mixtral checkpoint written by transformers whose experts are most of its bytes."""
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=d_model,
        intermediate_size=d_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def _nbytes(tensors: dict[str, torch.Tensor], *, experts: bool | None = None) -> int:
    return sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if experts is None or (".experts." in k) == experts
    )


# ----------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_weights_equal_the_file_bitwise(arch: str, tmp_path: Path) -> None:
    from mtl.models.lm.hf.tiny import tiny_hf_model

    tiny_hf_model(arch, seed=3).save_pretrained(tmp_path)
    lm = load_hf_checkpoint(tmp_path)
    ours = _loaded_as_file(lm, arch)
    theirs = _file(tmp_path)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], t), name


def test_loaded_weights_are_converted_once(tmp_path: Path) -> None:
    """A bfloat16 file loads bit for bit as bfloat16 and exactly as float32; a float32 file
    loads as bfloat16 rounded once (what ``Tensor.to`` gives)."""
    from mtl.models.lm.hf.tiny import tiny_hf_model

    model = tiny_hf_model("deepseek_v3", seed=4)
    model.save_pretrained(tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    f32, bf16 = _file(tmp_path / "f32"), _file(tmp_path / "bf16")
    cases = [
        ("bf16", torch.bfloat16, {k: t for k, t in bf16.items()}),
        ("bf16", torch.float32, {k: t.float() for k, t in bf16.items()}),
        ("f32", torch.bfloat16, {k: t.to(torch.bfloat16) for k, t in f32.items()}),
    ]
    for folder, dtype, expected in cases:
        ours = _loaded_as_file(load_hf_checkpoint(tmp_path / folder, dtype=dtype), "deepseek_v3")
        for name, t in expected.items():
            assert ours[name].dtype == dtype, (folder, dtype, name)
            assert torch.equal(ours[name], t), (folder, dtype, name)


def test_a_wrong_expert_shape_is_named_not_broadcast(tmp_path: Path) -> None:
    """An in-place copy would broadcast a (1, D) weight over (H, D); loading refuses it."""
    from safetensors.torch import save_file

    from mtl.models.lm.hf.tiny import tiny_hf_model

    tiny_hf_model("olmoe").save_pretrained(tmp_path)
    tensors = _file(tmp_path)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj.*transposed.*\(32, 1\)"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_block_weights_equal_transformers_block_bitwise(arch: str) -> None:
    """``moe_layer_from_hf_block`` reads transformers' in-memory (fused) expert layout."""
    from mtl.models.lm.hf.tiny import moe_blocks, tiny_hf_model

    model = tiny_hf_model(arch, seed=6).to(torch.bfloat16)
    block = next(iter(moe_blocks(model).values()))
    layer = moe_layer_from_hf_block(block, model.config)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # (E, 2H, D), (E, D, H)
    H = down.shape[-1]
    bank = layer.experts
    assert bank.w_gate.dtype == torch.bfloat16
    assert torch.equal(bank.w_gate, gate_up[:, :H].transpose(1, 2))
    assert torch.equal(bank.w_up, gate_up[:, H:].transpose(1, 2))
    assert torch.equal(bank.w_down, down.transpose(1, 2))
    assert torch.equal(layer.gate.proj.weight, block.gate.weight)


# ----------------------------------------------------------------------------- the copies
def test_loading_allocates_the_model_once(tmp_path: Path) -> None:
    """Building the model is the only allocation: the file's tensors go straight into it
    (no stacked expert bank beside the parameters)."""
    directory = _save_mixtral(tmp_path, d_model=32, d_hidden=256, experts=8)
    file_tensors = _file(directory)
    expert_bytes = _nbytes(file_tensors, experts=True)
    assert expert_bytes > 10 * _nbytes(file_tensors, experts=False)  # the experts dominate
    with NewStorageBytes() as counted:
        lm = load_hf_checkpoint(directory)
    model_bytes = _nbytes(lm.state_dict())
    assert model_bytes == _nbytes(file_tensors)
    # the slack covers the rotary frequencies, which are not in the file
    assert model_bytes <= counted.bytes <= model_bytes + 4096


_PEAK_SCRIPT = """
import json, re, sys
from mtl.models.lm.hf import load_hf_checkpoint

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

load_hf_checkpoint(sys.argv[2])  # warm-up: torch's first-use allocations
try:  # start the peak (VmHWM) afresh from the current resident size
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    print(json.dumps({"reset": False}))
    sys.exit()
before = status("VmRSS")
lm = load_hf_checkpoint(sys.argv[1])
print(json.dumps({"reset": True, "peak": status("VmHWM") - before}))
"""


def test_peak_memory_of_loading_is_the_model_and_the_mapped_file(tmp_path: Path) -> None:
    """Peak resident memory of a fresh process: the parameters plus the file's pages, which
    safetensors maps (clean page cache, counted in ``VmHWM``) -- no second expert bank."""
    from mtl.models.lm.hf.tiny import tiny_hf_model

    directory = _save_mixtral(tmp_path / "big", d_model=128, d_hidden=2048, experts=8)
    tiny_hf_model("mixtral").save_pretrained(tmp_path / "tiny")
    file_bytes = (directory / "model.safetensors").stat().st_size
    model_bytes = _nbytes(_file(directory))  # a float32 file, a float32 model
    expert_bytes = _nbytes(_file(directory), experts=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(_PEAK_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    if not mem["reset"]:
        pytest.skip("/proc/self/clear_refs cannot reset the peak resident size here")
    assert mem["peak"] >= model_bytes  # the measurement sees the parameters
    # a stacked copy of the experts beside the parameters would add expert_bytes
    assert mem["peak"] <= model_bytes + file_bytes + expert_bytes // 4, mem
