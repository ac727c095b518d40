"""Token-choice top-k gates: plain (Switch, Mixtral, OLMoE) and noisy (Shazeer 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.gates.base import Router, check_k
from mtl.moe.routing import RoutingResult, bin_counts


class TopKGate(Router):
    """Each token picks its ``k`` highest-scoring experts.

    * ``softmax_after_topk=False, renormalize=False``: weights are the full
      softmax probabilities of the chosen experts (Switch with k=1, OLMoE).
    * ``renormalize=True`` (or, equivalently, ``softmax_after_topk=True``): the
      chosen weights sum to 1 (Mixtral, DeepSeekMoE's top-k variant).

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        k: experts per token, ``1 <= k <= E``.
        renormalize: rescale the chosen probabilities to sum to 1.
        softmax_after_topk: softmax over the k chosen logits only.
        input_jitter: multiplicative input jitter during training (Switch).

    Shapes:
        ``(T, d_model) ->`` RoutingResult with ``K = k``.

    Example:
        >>> gate = TopKGate(d_model=16, num_experts=8, k=2, renormalize=True)
        >>> r = gate(torch.randn(5, 16))
        >>> torch.allclose(r.weights_TK.sum(-1), torch.ones(5))
        True
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        input_jitter: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__(
            d_model=d_model, num_experts=num_experts, bias=bias, input_jitter=input_jitter
        )
        self.k = check_k(k, num_experts)
        self.renormalize = renormalize
        self.softmax_after_topk = softmax_after_topk

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.softmax_after_topk:
            top_logits_TK, experts_TK = torch.topk(logits_TE, self.k, dim=-1)
            weights_TK = torch.softmax(top_logits_TK, dim=-1)
        else:
            weights_TK, experts_TK = torch.topk(probs_TE, self.k, dim=-1)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return RoutingResult(
            weights_TK=weights_TK, experts_TK=experts_TK, logits_TE=logits_TE, probs_TE=probs_TE
        )


class NoisyTopKGate(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

    During training, ``H(x) = x W_g + N(0, 1) * (softplus(x W_noise) + eps)``; the
    top ``k`` noisy logits are kept and softmaxed. The result carries a smooth
    per-expert load estimate, ``sum_t P(H_te stays in the top k)``, computed with
    the normal CDF, for the paper's load loss (:func:`~mtl.moe.losses.load_cv_loss`).

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        k: experts per token.
        noise_epsilon: floor added to the learned noise std.

    Example:
        >>> gate = NoisyTopKGate(d_model=8, num_experts=4, k=2)
        >>> gate(torch.randn(6, 8)).load_estimate_E.shape
        torch.Size([4])
    """

    def __init__(
        self, *, d_model: int, num_experts: int, k: int, noise_epsilon: float = 1e-2
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.k = check_k(k, num_experts)
        if noise_epsilon < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {noise_epsilon}")
        self.noise_epsilon = noise_epsilon
        self.noise_proj = nn.Linear(d_model, num_experts, bias=False)
        # start with no learned noise so that early routing is not pure chance
        nn.init.zeros_(self.noise_proj.weight)

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        clean_TE = logits_TE
        if self.training:
            std_TE = F.softplus(F.linear(x_TD.float(), self.noise_proj.weight.float()))
            std_TE = std_TE + self.noise_epsilon
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        else:
            std_TE, noisy_TE = None, clean_TE
        top_logits_TK, experts_TK = torch.topk(noisy_TE, self.k, dim=-1)
        weights_TK = torch.softmax(top_logits_TK, dim=-1)
        load_E = self._load(clean_TE, noisy_TE, std_TE)
        return RoutingResult(
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            logits_TE=logits_TE,
            probs_TE=torch.softmax(clean_TE, dim=-1),
            load_estimate_E=load_E,
        )

    def _load(self, clean_TE: Tensor, noisy_TE: Tensor, std_TE: Tensor | None) -> Tensor:
        E = clean_TE.shape[-1]
        if std_TE is None or self.k == E:
            # no noise (eval) or every expert chosen: the exact count
            chosen = torch.topk(noisy_TE, self.k, dim=-1).indices
            return bin_counts(chosen, E).to(clean_TE.dtype)
        top_TK1 = torch.topk(noisy_TE, self.k + 1, dim=-1).values
        # threshold an expert must beat: the k-th value if it is currently out,
        # the (k+1)-th if it is in (then it competes with the best excluded one)
        thr_in_T1 = top_TK1[:, self.k : self.k + 1]
        thr_out_T1 = top_TK1[:, self.k - 1 : self.k]
        is_in_TE = noisy_TE > thr_in_T1
        normal_cdf = lambda z: 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # noqa: E731
        p_in = normal_cdf((clean_TE - thr_in_T1) / std_TE)
        p_out = normal_cdf((clean_TE - thr_out_T1) / std_TE)
        return torch.where(is_in_TE, p_in, p_out).sum(0)
