"""The language model's initialisation convention, applied module by module.

GPT-2's scheme: every weight matrix ``N(0, std)``, biases zero, and the
projections that write into the residual stream (attention ``o_proj``, FFN
``down_proj``, an expert bank's last layer) ``N(0, std / sqrt(2 L))`` so that
the residual's variance does not grow with depth ``L``.

:class:`~mtl.models.lm.TransformerLM` applies it to the parts it builds itself;
:class:`~mtl.models.lm.MoEFFN` applies it to the parts it builds
(:meth:`~mtl.models.lm.MoEFFN.reset_layer`). A MoE layer made any other way
keeps the weights it was given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtl.moe import ExpertBank, SwiGLUExperts

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")
"""Name endings of the Linear layers that write into the residual stream."""


def residual_std(std: float, n_layers: int) -> float:
    """``std / sqrt(2 L)``: the std of residual output projections.

    Example:
        >>> residual_std(0.02, 2)
        0.01
    """
    return std / math.sqrt(2 * n_layers)


@torch.no_grad()
def init_module_(name: str, module: nn.Module, *, std: float, out_std: float) -> None:
    """Initialise ``module``'s own parameters (not its children's) by the convention.

    Args:
        name: the module's qualified name (a Linear whose name ends in ``o_proj``
            or ``down_proj`` is a residual output).
        module: the module; kinds other than Linear, Embedding, SwiGLUExperts
            and ExpertBank are left unchanged.
        std: std of ordinary weights.
        out_std: std of residual output weights.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> init_module_("ffn.down_proj", lin, std=0.02, out_std=0.0)
        >>> lin.weight.abs().max().item(), lin.bias.abs().max().item()
        (0.0, 0.0)
    """
    if isinstance(module, nn.Linear | nn.Embedding):
        last = name.endswith(RESIDUAL_OUTPUTS)
        nn.init.normal_(module.weight, 0.0, out_std if last else std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, SwiGLUExperts):
        nn.init.normal_(module.w_gate, 0.0, std)
        nn.init.normal_(module.w_down, 0.0, out_std)
        nn.init.normal_(module.w_up, 0.0, std)
    elif isinstance(module, ExpertBank):
        for i, w in enumerate(module.weights):
            nn.init.normal_(w, 0.0, out_std if i == len(module.weights) - 1 else std)
        for b in module.biases:
            nn.init.zeros_(b)
