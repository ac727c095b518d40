"""UpcycledLM takes plain arguments: the dense model's keyword arguments and its weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtl.models.lm import TransformerLM
from mtl.models.lm.upcycled import UpcycledLM

DENSE = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": 16}
V = 23


def _trained_dense() -> TransformerLM:
    """A dense LM whose weights differ from a fresh one's (another seed, perturbed)."""
    torch.manual_seed(1)
    lm = TransformerLM(vocab_size=V, **DENSE)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lm.eval()


def test_dense_state_is_loaded_before_upcycling() -> None:
    dense = _trained_dense()
    torch.manual_seed(0)
    lm = UpcycledLM(dense=DENSE, vocab_size=V, num_experts=4, k=2, dense_state=dense.state_dict())
    lm.eval()
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # copies of the FFN, renormalised top-2: the dense model's function
        torch.testing.assert_close(lm(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
        expert = lm.moe_layers()[1].experts
        w_gate = dense.layers[1].ffn.gate_proj.weight  # (H, D) as nn.Linear stores it
        for e in range(4):
            torch.testing.assert_close(expert.w_gate[e], w_gate.T)
    torch.manual_seed(0)
    fresh = UpcycledLM(dense=DENSE, vocab_size=V, num_experts=4, k=2).eval()
    with torch.no_grad():  # negative control: without the weights it is another function
        assert not torch.allclose(fresh(x).logits, dense(x).logits, atol=1e-3)


def test_vocab_size_and_max_seq_len_override_the_dense_arguments() -> None:
    lm = UpcycledLM(
        dense={**DENSE, "vocab_size": 5, "max_seq_len": None},
        vocab_size=V,
        num_experts=2,
        k=1,
        max_seq_len=8,
    )
    assert lm.vocab_size == V and lm.max_seq_len == 8
    default = UpcycledLM(dense={**DENSE, "max_seq_len": None}, vocab_size=V, num_experts=2, k=1)
    assert default.max_seq_len == TransformerLM(vocab_size=V, d_model=16, n_heads=2).max_seq_len


def test_weights_of_another_shape_are_refused() -> None:
    deeper = TransformerLM(vocab_size=V, **{**DENSE, "n_layers": 3})
    with pytest.raises(ValueError, match=r"dense_state does not fit .*unexpected \['layers\.2"):
        UpcycledLM(dense=DENSE, vocab_size=V, num_experts=2, k=1, dense_state=deeper.state_dict())
    state = _trained_dense().state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        UpcycledLM(dense=DENSE, vocab_size=V, num_experts=2, k=1, dense_state=state)
    wider = TransformerLM(vocab_size=V, **{**DENSE, "d_ff": 48})
    with pytest.raises(
        ValueError,
        match=r"other shapes \['layers\.0\.ffn\.down_proj\.weight \(16, 48\) for \(16, 32\)",
    ):
        UpcycledLM(dense=DENSE, vocab_size=V, num_experts=2, k=1, dense_state=wider.state_dict())


def test_a_dense_node_with_moe_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="moe: null"):
        UpcycledLM(dense={**DENSE, "moe": {"num_experts": 4}}, vocab_size=V, num_experts=2, k=1)


def test_the_model_module_imports_without_hydra_or_omegaconf() -> None:
    code = (
        "import sys; import mtl.models.lm.upcycled; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
