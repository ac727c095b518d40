"""transformers MoE checkpoints in and out: Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3.

Each architecture is checked on a tiny random model built locally with
transformers (:func:`mtl.models.lm.hf.tiny.tiny_hf_model`): per MoE block
against transformers' block, whole model (logits within 1e-5 in float32)
loaded from a ``save_pretrained`` directory, and the export round trip
(mtl -> directory -> transformers, and -> mtl again). Every equality has a
negative control showing that the comparison would catch a wrong weight or a
missing part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl.models.lm.hf import (
    ARCHITECTURES,
    load_hf_checkpoint,
    moe_layer_from_hf_block,
    save_hf_checkpoint,
)
from mtl.models.lm.hf.tiny import TINY_VOCAB, moe_blocks, tiny_hf_model
from mtl.moe import NoisyTopKGate, SigmoidBiasGate, SigmoidGatedSharedExpert, TopKGate

try:
    import transformers
except ImportError:  # pragma: no cover - the [hf] extra is missing
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("transformers is not installed (pip install '.[hf]')", allow_module_level=True)

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"]
ATOL = 1e-5


def _ids(seed: int = 0, B: int = 2, T: int = 13) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _mtl_logits(lm: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm(ids).logits


@pytest.fixture(params=ARCHS)
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, Path]:
    """(architecture, transformers model, its save_pretrained directory)."""
    model = tiny_hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return request.param, model, tmp_path / "hf"


def test_all_architectures_registered() -> None:
    assert sorted(ARCHITECTURES) == sorted(ARCHS)


# ----------------------------------------------------------------------------- per block
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_block_matches_transformers(arch: str) -> None:
    model = tiny_hf_model(arch)
    blocks = moe_blocks(model)
    assert blocks
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for block in blocks.values():
        layer = moe_layer_from_hf_block(block, model.config)
        with torch.no_grad():
            ref = block(x)
            out = layer(x).output
        assert ref.abs().max() > 0.5  # not a comparison of near-zero outputs
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def _perturbed_router(layer: Any) -> None:
    with torch.no_grad():
        layer.gate.proj.weight[0] += 1.0  # one expert's router row


@pytest.mark.parametrize("arch", ARCHS)
def test_block_negative_control_router_weight(arch: str) -> None:
    """One router row changed: the block output moves far beyond the tolerance."""
    model = tiny_hf_model(arch)
    block = next(iter(moe_blocks(model).values()))
    layer = moe_layer_from_hf_block(block, model.config)
    _perturbed_router(layer)
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (layer(x).output - block(x)).abs().max().item()
    assert diff > 100 * ATOL


def test_qwen2_moe_block_needs_the_shared_gate() -> None:
    """Without the sigmoid gate (shared expert added ungated) Qwen2-MoE's block is missed."""
    model = tiny_hf_model("qwen2_moe")
    block = next(iter(moe_blocks(model).values()))
    layer = moe_layer_from_hf_block(block, model.config)
    assert isinstance(layer.shared, SigmoidGatedSharedExpert)
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x)
        layer.shared = layer.shared.expert  # ungated: what mtl did before
        diff = (layer(x).output - ref).abs().max().item()
    assert diff > 0.1


def test_deepseek_v3_block_needs_group_limited_routing() -> None:
    """Ungrouped top-k (topk_group = n_group) routes differently from DeepSeek-V3's block."""
    model = tiny_hf_model("deepseek_v3")
    block = next(iter(moe_blocks(model).values()))
    layer = moe_layer_from_hf_block(block, model.config)
    assert isinstance(layer.gate, SigmoidBiasGate)
    assert (layer.gate.n_group, layer.gate.topk_group) == (4, 2)
    x = torch.randn(4, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x)
        layer.gate.topk_group = layer.gate.n_group
        diff = (layer(x).output - ref).abs().max().item()
    assert diff > 0.1


# ----------------------------------------------------------------------------- whole model
def test_whole_model_logits_match(saved: tuple[str, Any, Path]) -> None:
    _, model, directory = saved
    lm = load_hf_checkpoint(directory)
    ids = _ids()
    ref = _hf_logits(model, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(_mtl_logits(lm, ids), ref, atol=ATOL, rtol=0)
    assert len(lm.moe_layers()) == len(moe_blocks(model))
    assert (lm.lm_head.weight is lm.embed.weight) == bool(model.config.tie_word_embeddings)


def test_whole_model_negative_control(saved: tuple[str, Any, Path]) -> None:
    """One router row of the last MoE layer changed: the logits leave the tolerance."""
    _, model, directory = saved
    lm = load_hf_checkpoint(directory)
    _perturbed_router(lm.moe_layers()[max(lm.moe_layers())])
    ids = _ids()
    diff = (_mtl_logits(lm, ids) - _hf_logits(model, ids)).abs().max().item()
    assert diff > 100 * ATOL


def test_sharded_checkpoint(tmp_path: Path) -> None:
    """Shards listed in model.safetensors.index.json are read like one file."""
    model = tiny_hf_model("qwen2_moe")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = _ids()
    lm = load_hf_checkpoint(tmp_path)
    torch.testing.assert_close(_mtl_logits(lm, ids), _hf_logits(model, ids), atol=ATOL, rtol=0)


def test_deepseek_v3_rope_layout_matters(tmp_path: Path) -> None:
    """Negative control of latent attention: reading interleaved rotary channels as halves is wrong."""
    model = tiny_hf_model("deepseek_v3")
    model.save_pretrained(tmp_path)
    lm = load_hf_checkpoint(tmp_path)
    for blk in lm.layers:
        blk.attn.rope_interleave = False
    ids = _ids()
    assert (_mtl_logits(lm, ids) - _hf_logits(model, ids)).abs().max() > 100 * ATOL


YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.7,
}


def test_deepseek_v3_with_yarn_rope_scaling(tmp_path: Path) -> None:
    """YaRN (as in DeepSeek-V3's released config): frequencies, cos/sin factor, softmax scale."""
    model = tiny_hf_model("deepseek_v3", rope_scaling=YARN)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    model.save_pretrained(tmp_path / "hf")
    lm = load_hf_checkpoint(tmp_path / "hf")
    ids = _ids(T=40)
    ref = _hf_logits(model, ids)
    torch.testing.assert_close(_mtl_logits(lm, ids), ref, atol=ATOL, rtol=0)
    out = save_hf_checkpoint(lm, tmp_path / "export", model_type="deepseek_v3")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_hf_logits(back, ids), ref, atol=ATOL, rtol=0)
    # negative control: the same weights with plain rotary positions
    plain = tiny_hf_model("deepseek_v3")
    plain.save_pretrained(tmp_path / "plain")
    diff = (_mtl_logits(load_hf_checkpoint(tmp_path / "plain"), ids) - ref).abs().max()
    assert diff > 100 * ATOL


def test_export_round_trip(saved: tuple[str, Any, Path], tmp_path: Path) -> None:
    """mtl -> directory -> transformers gives the same logits; -> mtl gives the same weights."""
    arch, model, directory = saved
    lm = load_hf_checkpoint(directory)
    out = save_hf_checkpoint(lm, tmp_path / "export", model_type=arch)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(model).__name__
    ids = _ids(seed=3)
    torch.testing.assert_close(_hf_logits(reloaded, ids), _hf_logits(model, ids), atol=ATOL, rtol=0)
    again = load_hf_checkpoint(out)
    for (name, a), (_, b) in zip(lm.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # negative control: a corrupted file is loaded as such (the check above can fail)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if k.endswith(".gate.weight"))
    tensors[key][0] += 1.0  # one expert's router row (a shift of every row cancels in a softmax)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    broken = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_hf_logits(broken, ids) - _hf_logits(model, ids)).abs().max() > 100 * ATOL


def test_mtl_preset_exports_as_mixtral(build_preset: Any, tmp_path: Path) -> None:
    """An LM trained from conf/model/lm_mixtral.yaml is a Mixtral checkpoint transformers runs."""
    lm = build_preset("lm_mixtral", vocab_size=61, max_seq_len=32, tie_embeddings=False).eval()
    with torch.no_grad():  # a trained-looking model: no parameter at its initial value
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = save_hf_checkpoint(lm, tmp_path / "mixtral", model_type="mixtral")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_hf_logits(reloaded, ids), _mtl_logits(lm, ids), atol=ATOL, rtol=0)


def test_config_built_gated_shared_expert_exports_as_qwen2_moe(
    build_preset: Any, tmp_path: Path
) -> None:
    """lm_mixtral + a sigmoid-gated shared expert from config is a Qwen2-MoE checkpoint."""
    shared = {
        "_target_": "mtl.moe.SigmoidGatedSharedExpert",
        "_partial_": True,
        "expert": {"_target_": "mtl.models.lm.SwiGLU", "_partial_": True, "d_hidden": 48},
    }
    lm = build_preset("lm_mixtral", vocab_size=61, max_seq_len=32, **{"moe.shared": shared}).eval()
    assert all(isinstance(m.shared, SigmoidGatedSharedExpert) for m in lm.moe_layers().values())
    out = save_hf_checkpoint(lm, tmp_path / "qwen", model_type="qwen2_moe")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_hf_logits(reloaded, ids), _mtl_logits(lm, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- errors
def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_unsupported_settings_are_named(tmp_path: Path) -> None:
    model = tiny_hf_model("mixtral")
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window=8"):
        load_hf_checkpoint(tmp_path)
    _edit_config(tmp_path, sliding_window=None, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_hf_checkpoint(tmp_path)
    _edit_config(
        tmp_path, model_type="mixtral", rope_parameters={"rope_type": "yarn", "factor": 4.0}
    )
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_and_extra_tensors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_hf_model("olmoe")
    model.save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, file)
    with pytest.raises(KeyError, match="q_norm"):
        load_hf_checkpoint(tmp_path)
    tensors["model.layers.1.self_attn.q_norm.weight"] = torch.ones(32)
    tensors["model.layers.1.mlp.extra.weight"] = torch.ones(3)
    save_file(tensors, file)
    with pytest.raises(KeyError, match="no place"):
        load_hf_checkpoint(tmp_path)


def test_export_refuses_an_lm_of_another_structure(build_preset: Any, tmp_path: Path) -> None:
    lm = build_preset("lm_mixtral", vocab_size=61, max_seq_len=32)
    with pytest.raises(ValueError, match=r"cannot be exported as olmoe: .*query/key norm"):
        save_hf_checkpoint(lm, tmp_path, model_type="olmoe")
    layer = lm.moe_layers()[1]
    layer.gate = NoisyTopKGate(d_model=lm.d_model, num_experts=layer.num_experts, k=2)
    with pytest.raises(ValueError, match=r"layer 1 gate must be TopKGate"):
        save_hf_checkpoint(lm, tmp_path, model_type="mixtral")
    # Mixtral renormalises over the chosen experts; OLMoE may or may not.
    layer.gate = TopKGate(d_model=lm.d_model, num_experts=layer.num_experts, k=2)
    with pytest.raises(ValueError, match=r"layer 1 gate must have renormalize=True"):
        save_hf_checkpoint(lm, tmp_path, model_type="mixtral")


def test_deepseek_v3_norm_epsilons(tmp_path: Path) -> None:
    """transformers reads ``rms_norm_eps`` for the layer and final norms only and builds the
    latent norms with 1e-6: such a model round-trips; other epsilons are refused on export."""
    model = tiny_hf_model("deepseek_v3", rms_norm_eps=1e-5)
    attn = model.model.layers[0].self_attn
    assert model.model.layers[0].input_layernorm.variance_epsilon == 1e-5
    assert attn.q_a_layernorm.variance_epsilon == attn.kv_a_layernorm.variance_epsilon == 1e-6
    model.save_pretrained(tmp_path / "hf")
    lm = load_hf_checkpoint(tmp_path / "hf")
    ids = _ids()
    ref = _hf_logits(model, ids)
    torch.testing.assert_close(_mtl_logits(lm, ids), ref, atol=ATOL, rtol=0)
    out = save_hf_checkpoint(lm, tmp_path / "export", model_type="deepseek_v3")
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-5
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_hf_logits(back, ids), ref, atol=ATOL, rtol=0)

    lm.layers[2].ffn_norm.eps = 1e-3  # transformers' config cannot say this
    with pytest.raises(ValueError, match=r"deepseek_v3: RMSNorm epsilons differ"):
        save_hf_checkpoint(lm, tmp_path / "bad", model_type="deepseek_v3")
    lm.layers[2].ffn_norm.eps = 1e-5
    lm.layers[1].attn.kv_a_layernorm.eps = 1e-5  # transformers fixes it to 1e-6
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.kv_a_layernorm has epsilon 1e-05"):
        save_hf_checkpoint(lm, tmp_path / "bad", model_type="deepseek_v3")
