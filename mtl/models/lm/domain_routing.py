"""Condition routing in the LM (MoDE-style): MoE gates that see a sequence's domain, not its tokens.

With ``MoEFFN(route_on="domain")`` every gate of the LM is built ``domain_dim``
wide and :class:`~mtl.models.lm.TransformerLM` holds one
:class:`DomainEmbedding`; ``lm(idx_BT, domain_B=ids)`` then routes every token
of sequence ``b`` on the embedding of ``domain_B[b]``: the routing depends on
the domain only, the experts still compute on the tokens' hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class DomainEmbedding(nn.Module):
    """A learned embedding of the domain id of each sequence, broadcast over its tokens.

    Args:
        num_domains: how many ids, ``0 .. num_domains - 1``.
        dim: the width of the gates' input.
        default_domain: the id of sequences given without one (sampling with
            ``mtl generate``); None: the ids are required.

    Shapes:
        ``domain_B (B,) int64, T -> (B, T, dim)``.

    Example:
        >>> emb = DomainEmbedding(num_domains=2, dim=4)
        >>> emb(torch.tensor([0, 1, 1]), 5).shape
        torch.Size([3, 5, 4])
    """

    def __init__(self, *, num_domains: int, dim: int, default_domain: int | None = None) -> None:
        super().__init__()
        if num_domains < 1 or dim < 1:
            raise ValueError(f"need num_domains >= 1 and dim >= 1, got {num_domains}, {dim}")
        if default_domain is not None and not 0 <= default_domain < num_domains:
            raise ValueError(f"default_domain must be in [0, {num_domains}), got {default_domain}")
        self.num_domains = num_domains
        self.default_domain = default_domain
        self.embed = nn.Embedding(num_domains, dim)

    def forward(self, domain_B: Tensor, T: int) -> Tensor:
        if domain_B.dim() != 1:
            raise ValueError(f"domain_B must be (B,) domain ids, got shape {tuple(domain_B.shape)}")
        # one host read for both bounds
        lo, hi = torch.stack(torch.aminmax(domain_B)).tolist() if domain_B.numel() else (0, 0)
        if not (lo >= 0 and hi < self.num_domains):
            raise ValueError(
                f"domain ids must be in [0, {self.num_domains}), got {domain_B.unique().tolist()}"
            )
        return self.embed(domain_B)[:, None, :].expand(-1, T, -1)

    @classmethod
    def for_factory(cls, moe: Any) -> DomainEmbedding | None:
        """The embedding an MoE factory with ``route_on="domain"`` asks for, else None."""
        if getattr(moe, "route_on", "input") != "domain":
            return None
        default = getattr(moe, "default_domain", None)
        return cls(
            num_domains=int(moe.num_domains),
            dim=int(moe.domain_dim),
            default_domain=None if default is None else int(default),
        )


def domain_condition(
    embedding: DomainEmbedding | None, domain_B: Tensor | None, idx_BT: Tensor
) -> Tensor | None:
    """``(B, T, domain_dim)`` gate input of a domain-routed LM; None for one routing on tokens.

    Raises:
        ValueError: domain ids missing for a domain-routed model, given to another
            model, or not one per sequence.

    Example:
        >>> domain_condition(None, None, torch.zeros(2, 3, dtype=torch.long)) is None
        True
    """
    if embedding is None:
        if domain_B is not None:
            raise ValueError(
                "domain_B was given but the model's gates route on the tokens "
                "(build it with moe.route_on=domain to route on a domain)"
            )
        return None
    if domain_B is None and embedding.default_domain is not None:
        domain_B = torch.full((idx_BT.shape[0],), embedding.default_domain, dtype=torch.long)
    if domain_B is None:
        raise ValueError(
            "the model routes on the domain (moe.route_on=domain): pass domain_B, one id per sequence"
        )
    if domain_B.shape[0] != idx_BT.shape[0]:
        raise ValueError(
            f"domain_B has {domain_B.shape[0]} ids for a batch of {idx_BT.shape[0]} sequences"
        )
    return embedding(domain_B.to(device=idx_BT.device, dtype=torch.long), idx_BT.shape[1])
