"""Numerical equivalence of mtl with transformers' MoE models: per block, whole model, export.

For each supported architecture (Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3) a tiny
random model is built with transformers (:func:`mtl.models.lm.hf.tiny.tiny_hf_model`),
saved with ``save_pretrained`` and loaded into mtl's ``TransformerLM``; float32, CPU.

Columns:

* block max diff -- max |mtl MoELayer - transformers block| over every MoE block
  (input ``randn(4, 32, D)``);
* logits max diff -- max |mtl - transformers| of the whole model's logits;
* export round trip -- mtl -> ``save_hf_checkpoint`` -> transformers
  ``from_pretrained``: max logits difference to the original model, and whether
  loading that directory into mtl again gives bit-identical weights;
* without the new part -- the block difference when Qwen2-MoE's shared expert is
  added ungated, or DeepSeek-V3's routing is not group-limited (what mtl computed
  before these parts existed).

Usage::

    python benchmarks/hf_equivalence.py [--out benchmarks/out/hf_equivalence.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_json

from mtl.models.lm.hf import load_hf_checkpoint, moe_layer_from_hf_block, save_hf_checkpoint
from mtl.models.lm.hf.tiny import TINY_VOCAB, moe_blocks, tiny_hf_model

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 1.0,
    "mscale_all_dim": 0.7,
}
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mixtral", "mixtral", {}),
    ("olmoe", "olmoe", {}),
    ("qwen2_moe", "qwen2_moe", {}),
    ("deepseek_v3", "deepseek_v3", {}),
    ("deepseek_v3 + YaRN", "deepseek_v3", {"rope_scaling": YARN}),
)


def _without_new_part(arch: str, layer: Any) -> bool:
    """Switch off the part mtl lacked before (in place); False if the architecture has none."""
    if arch == "qwen2_moe":
        layer.shared = layer.shared.expert
        return True
    if arch == "deepseek_v3":
        layer.gate.topk_group = layer.gate.n_group
        return True
    return False


@torch.no_grad()
def measure(label: str, arch: str, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    import transformers

    work = work / label.replace(" ", "_").replace("+", "")
    model = tiny_hf_model(arch, **overrides)
    x = torch.randn(4, 32, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    block_diff, old_diff = 0.0, None
    for block in moe_blocks(model).values():
        layer = moe_layer_from_hf_block(block, model.config)
        ref = block(x)
        block_diff = max(block_diff, (layer(x).output - ref).abs().max().item())
        if _without_new_part(arch, layer):
            old_diff = max(old_diff or 0.0, (layer(x).output - ref).abs().max().item())
    src = work / "hf"
    model.save_pretrained(src)
    lm = load_hf_checkpoint(src)
    ids = torch.randint(0, TINY_VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    ref_logits = model(ids).logits
    logits_diff = (lm(ids).logits - ref_logits).abs().max().item()
    out = save_hf_checkpoint(lm, work / "export", model_type=arch)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    export_diff = (back(ids).logits - ref_logits).abs().max().item()
    again = load_hf_checkpoint(out)
    identical = all(
        torch.equal(a, b)
        for a, b in zip(lm.state_dict().values(), again.state_dict().values(), strict=True)
    )
    return {
        "architecture": label,
        "moe_blocks": len(moe_blocks(model)),
        "block_max_diff": block_diff,
        "logits_max_diff": logits_diff,
        "logits_max_abs": ref_logits.abs().max().item(),
        "export_logits_max_diff": export_diff,
        "export_reload_identical": identical,
        "without_new_part_block_max_diff": old_diff,
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(*variant, Path(tmp)) for variant in VARIANTS]
    table = markdown_table(
        [
            "architecture",
            "block max diff",
            "whole-model logits max diff",
            "export round-trip (logits diff; mtl reload)",
            "without the new part",
        ],
        [
            [
                r["architecture"],
                f"{r['block_max_diff']:.1e}",
                f"{r['logits_max_diff']:.1e} (max logit {r['logits_max_abs']:.1f})",
                f"{r['export_logits_max_diff']:.1e}; "
                + ("identical" if r["export_reload_identical"] else "DIFFERENT"),
                "-"
                if r["without_new_part_block_max_diff"] is None
                else f"{r['without_new_part_block_max_diff']:.2f}",
            ]
            for r in rows
        ],
    )
    print(table)
    path = write_json(
        "hf_equivalence", {"rows": rows, "dtype": "float32", "device": "cpu"}, args.out
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
