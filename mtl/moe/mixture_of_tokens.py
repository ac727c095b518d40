"""Mixture of Tokens (Antoniak et al. 2023): a continuous MoE that mixes tokens across examples.

The batch is cut into groups of ``group_size`` consecutive examples; the tokens
of a group at the same position ``t`` are mixed (never tokens of different
positions, so a causal model stays causal). For such a group ``x_1 .. x_g``:

* controller scores ``s_ie = x_i . c_e`` (one vector ``c_e`` per expert);
* mixing weights, a softmax *over the group* per expert, at temperature ``tau``:
  ``w_ie = exp(s_ie / tau) / sum_j exp(s_je / tau)``;
* expert ``e`` processes one mixed token ``m_e = sum_i w_ie x_i``;
* its output goes back to the group's tokens with the same weights:
  ``y_i = sum_e w_ie E_e(m_e)``.

Every expert runs once per group and position: ``g`` times fewer expert rows
than tokens, and the function is differentiable everywhere (no top-k).

Transition tuning: lowering ``tau`` towards 0 makes ``w_.e`` one-hot, i.e.
each expert takes the single highest-scoring token of the group (a sparse,
expert-choice-like routing with one slot per group); :class:`TemperatureSchedule`
lowers it during training.

Group size 1: ``w_1e = 1`` for every expert whatever ``tau``, so
``y = sum_e E_e(x)``: a dense FFN of width ``E * H`` (the experts' weights
concatenated along the hidden axis).

Every group is full: the batch size must be a multiple of ``group_size``, in
training, validation and generation alike, and another batch size is refused.
The softmax is over the group, so a group's size changes the function: in a
group of one ``w_1e = 1`` for every expert and a token gets the *sum* of all
experts' outputs, while in a group of ``g`` each expert's weights sum to 1
across the ``g`` tokens and a token gets about ``1/g`` of that. A smaller last
group (a short batch, or one prompt sampled alone) would therefore run another
function than the one trained. The run's config checks refuse a
``data.batch_size`` or ``data.val_batch_size`` that ``group_size`` does not
divide, the text data module's ``batch_multiple`` drops the validation blocks
that do not fill a last group, and :func:`~mtl.models.lm.generate.generate`
fills the last group with copies of the last prompt (:func:`token_group_size`).

Shape names: the batch ``B`` is ``W`` groups of ``Z = group_size`` examples (``x_WZTD``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.experts import GroupedExperts


class MixtureOfTokens(nn.Module):
    """Mixture-of-Tokens feed-forward layer over a ``(B, T, D)`` batch.

    Args:
        d_model: ``D``.
        experts: the expert bank (e.g. :class:`~mtl.moe.SwiGLUExperts`), run
            through its ``forward_all`` on per-expert inputs ``(E, W*T, D)``.
        group_size: examples mixed together (``g``; ``Z`` in shape suffixes).
        temperature: initial softmax temperature ``tau`` (a buffer: saved, and
            set by :class:`TemperatureSchedule`).

    Attributes:
        controller: ``nn.Linear(D, E)``, the scores ``s_ie``.

    Shapes:
        ``(B, T, D) -> (B, T, D)``.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> mot = MixtureOfTokens(d_model=8, group_size=4,
        ...                       experts=SwiGLUExperts(num_experts=3, d_model=8, d_hidden=16))
        >>> mot(torch.randn(8, 5, 8)).shape  # two groups of 4 examples
        torch.Size([8, 5, 8])
        >>> mot(torch.randn(6, 5, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: MixtureOfTokens mixes groups of group_size=4 examples, got a batch of 6: ...
    """

    def __init__(
        self,
        *,
        d_model: int,
        experts: GroupedExperts,
        group_size: int,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.d_model, self.group_size = d_model, int(group_size)
        self.num_experts = experts.num_experts
        self.controller = nn.Linear(d_model, self.num_experts, bias=False)
        self.experts = experts
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def mixing_weights(self, x_BTD: Tensor) -> Tensor:
        """Softmax over each group of the scores, float32: ``(W, Z, T, E)`` for ``W`` groups."""
        self._check_batch(x_BTD)
        B, T, D = x_BTD.shape
        x_WZTD = x_BTD.view(B // self.group_size, self.group_size, T, D)
        scores_WZTE = F.linear(x_WZTD.float(), self.controller.weight.float())
        return torch.softmax(scores_WZTE / self.temperature, dim=1)

    def _check_batch(self, x_BTD: Tensor) -> None:
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.d_model:
            raise ValueError(
                f"MixtureOfTokens expects (B, T, {self.d_model}) inputs, got {tuple(x_BTD.shape)}"
            )
        if x_BTD.shape[0] % self.group_size:
            # a smaller group runs another function (see the module docstring)
            raise ValueError(
                f"MixtureOfTokens mixes groups of group_size={self.group_size} examples, got a "
                f"batch of {x_BTD.shape[0]}: the batch size (data.batch_size, "
                "data.val_batch_size, per process) must be a multiple of model.moe.group_size"
            )

    def forward(self, x_BTD: Tensor) -> Tensor:
        w_WZTE = self.mixing_weights(x_BTD)
        B, T, D = x_BTD.shape
        W, Z = w_WZTE.shape[:2]
        x_WZTD = x_BTD.view(W, Z, T, D)
        w_WZTE = w_WZTE.to(x_BTD.dtype)
        # one mixed token per group, position and expert: (E, W*T, D)
        mixed_EWTD = torch.einsum("wzte,wztd->ewtd", w_WZTE, x_WZTD)
        y_EWTD = self.experts.forward_all(mixed_EWTD.reshape(self.num_experts, W * T, D))
        y_EWTD = y_EWTD.reshape(self.num_experts, W, T, D)
        out_WZTD = torch.einsum("wzte,ewtd->wztd", w_WZTE, y_EWTD)
        return out_WZTD.reshape(B, T, D)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, temperature={float(self.temperature):.4g}"


class MixtureOfTokensFFN:
    """Factory of the Mixture-of-Tokens FFNs of a :class:`~mtl.models.lm.TransformerLM`.

    Given as the LM's ``moe``; called ``(layer_index, d_model)``, it builds
    ``MixtureOfTokens(d_model=, experts=experts(d_model=, num_experts=), group_size=, temperature=)``.
    The LM initialises the layer with its own convention (controller and
    experts ``N(0, init_std)``, ``w_down`` scaled as a residual output).

    Args:
        num_experts: ``E``.
        experts: factory of the bank (``partial(SwiGLUExperts, d_hidden=...)``).
        group_size: examples mixed together.
        temperature: initial temperature.

    Example:
        >>> from functools import partial
        >>> from mtl.moe import SwiGLUExperts
        >>> make = MixtureOfTokensFFN(num_experts=4, group_size=8,
        ...                           experts=partial(SwiGLUExperts, d_hidden=16))
        >>> make(0, 32).experts.w_gate.shape
        torch.Size([4, 32, 16])
    """

    def __init__(
        self,
        *,
        num_experts: int,
        experts: type[GroupedExperts] | object,
        group_size: int,
        temperature: float = 1.0,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.experts = num_experts, experts
        self.group_size, self.temperature = group_size, temperature

    def __call__(self, layer_index: int, d_model: int) -> MixtureOfTokens:
        bank = self.experts(d_model=d_model, num_experts=self.num_experts)  # type: ignore[operator]
        return MixtureOfTokens(
            d_model=d_model,
            experts=bank,
            group_size=self.group_size,
            temperature=self.temperature,
        )


def token_group_size(model: nn.Module) -> int:
    """The batch multiple ``model``'s :class:`MixtureOfTokens` layers need: the least common
    multiple of their group sizes, 1 where there is none.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> layer = MixtureOfTokens(d_model=4, group_size=4,
        ...                         experts=SwiGLUExperts(num_experts=2, d_model=4, d_hidden=4))
        >>> token_group_size(nn.Sequential(layer)), token_group_size(nn.Linear(2, 2))
        (4, 1)
    """
    sizes = [m.group_size for m in model.modules() if isinstance(m, MixtureOfTokens)]
    return math.lcm(*sizes) if sizes else 1


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of every :class:`MixtureOfTokens` in ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfTokens)]
    for layer in layers:
        layer.temperature.fill_(float(temperature))
    return len(layers)


class TemperatureSchedule:
    """Transition tuning: the MoT temperature falls from ``start`` to ``end`` over ``steps`` steps.

    ``tau(s) = start * (end / start) ** (s / steps)`` (``kind="exponential"``) or
    ``start + (end - start) s / steps`` (``"linear"``), ``s`` the global step,
    held at ``end`` afterwards. :class:`~mtl.training.callbacks.TokenMixingTemperature`
    applies it before every training step.

    Args:
        start: temperature at step 0.
        end: final temperature (> 0).
        steps: steps to go from ``start`` to ``end``.
        kind: ``"exponential"`` or ``"linear"``.

    Example:
        >>> sched = TemperatureSchedule(start=1.0, end=0.01, steps=100)
        >>> round(sched.at(0), 4), round(sched.at(50), 4), round(sched.at(1000), 4)
        (1.0, 0.1, 0.01)
    """

    def __init__(
        self,
        *,
        start: float = 1.0,
        end: float = 0.05,
        steps: int = 1000,
        kind: Literal["exponential", "linear"] = "exponential",
    ) -> None:
        if start <= 0 or end <= 0 or steps < 1:
            raise ValueError(f"need start, end > 0 and steps >= 1, got {start}, {end}, {steps}")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"kind must be 'exponential' or 'linear', got {kind!r}")
        self.start, self.end, self.steps, self.kind = float(start), float(end), int(steps), kind

    def at(self, step: int) -> float:
        """The temperature at global step ``step``."""
        frac = min(max(step, 0) / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.start * (self.end / self.start) ** frac
