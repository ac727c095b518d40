"""YaRN frequencies and factors against transformers' own ``ROPE_INIT_FUNCTIONS['yarn']``."""

from __future__ import annotations

import os

import pytest
import torch

from mtl.models.lm.rope_scaling import YarnScaling, yarn_mscale

try:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
except ImportError:  # pragma: no cover - the [hf] extra is missing
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("transformers is not installed (pip install '.[hf]')", allow_module_level=True)


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 16},
        {
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        {
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 0.9,
            "mscale_all_dim": 0.7,
            "truncate": False,
        },
        {"factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    ],
)
def test_yarn_matches_transformers(params: dict) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **params}
    max_pos = int(params["factor"] * params["original_max_position_embeddings"])
    cfg = transformers.DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=16,
        max_position_embeddings=max_pos,
        rope_scaling=rope,
    )
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    y = YarnScaling.from_config(cfg.rope_parameters, max_position_embeddings=max_pos)
    inv = y.inv_freq(head_dim=16, base=10000.0)
    torch.testing.assert_close(inv, ref_inv, atol=0, rtol=1e-6)
    assert y.cos_sin_factor() == pytest.approx(ref_factor)
    # negative control: interpolation actually changed some frequencies
    plain = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert (inv - plain).abs().max() > 1e-3


def test_softmax_scale_multiplier() -> None:
    y = YarnScaling(
        factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
    )
    assert y.softmax_scale_multiplier() == pytest.approx(
        (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2
    )
    assert (
        YarnScaling(factor=4.0, original_max_position_embeddings=8).softmax_scale_multiplier()
        == 1.0
    )
    assert yarn_mscale(0.5) == 1.0
