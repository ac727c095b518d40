"""Input layer of the rec models: categorical embeddings concatenated with numeric features."""

from __future__ import annotations

import torch
from torch import nn

from mtl.data.features import FeatureSpec


class FeatureEmbedding(nn.Module):
    """Embed the categorical features and concatenate them with the numeric ones.

    One ``nn.Embedding(vocab_size + 1, embed_dim)`` per categorical feature; row 0
    is the OOV / unseen / null category. It is a trained row, not padding: train
    rows with nulls or rare categories teach it what "unknown" means, which is
    what validation/test rows with unseen categories then get. Numeric features
    arrive standardised by the data layer and pass through unchanged.

    Args:
        spec: the fitted :class:`~mtl.data.features.FeatureSpec`.
        init_std: std of the normal initialisation of the embedding tables (small,
            as usual for sparse-feature models, so no field dominates at the start).

    Shapes:
        - ``cat``: (B, F_c) int64 indices in ``[0, vocab_size]`` per column.
        - ``num``: (B, F_n) float.
        - output: (B, D_in) with ``D_in = sum(embed_dim) + F_n`` (:attr:`output_dim`),
          in spec order: categorical embeddings first, then numeric values.

    Example:
        >>> from mtl.data.features import CategoricalFeature, NumericFeature, TaskSpec
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)],
        ...     numeric=[NumericFeature("price", 0.0, 1.0)], tasks=[TaskSpec("click", "binary")])
        >>> emb = FeatureEmbedding(spec=spec)
        >>> emb(torch.tensor([[3], [0]]), torch.zeros(2, 1)).shape, emb.output_dim
        (torch.Size([2, 5]), 5)
    """

    def __init__(self, *, spec: FeatureSpec, init_std: float = 0.01) -> None:
        super().__init__()
        self.spec = spec
        self.tables = nn.ModuleList(
            nn.Embedding(f.vocab_size + 1, f.embed_dim) for f in spec.categorical
        )
        for table in self.tables:
            nn.init.normal_(table.weight, std=init_std)
        self.n_categorical = spec.n_categorical
        self.n_numeric = spec.n_numeric
        self._output_dim = sum(f.embed_dim for f in spec.categorical) + spec.n_numeric

    @property
    def output_dim(self) -> int:
        """Width ``D_in`` of the concatenated output."""
        return self._output_dim

    def embed_categorical(self, cat: torch.Tensor) -> list[torch.Tensor]:
        """Per categorical feature, its (B, embed_dim) embedding."""
        return [table(cat[:, j]) for j, table in enumerate(self.tables)]

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """(B, F_c) int64, (B, F_n) float -> (B, D_in)."""
        if cat.ndim != 2 or cat.shape[1] != self.n_categorical:
            raise ValueError(
                f"cat must have shape (B, {self.n_categorical}), got {tuple(cat.shape)}"
            )
        if num.ndim != 2 or num.shape[1] != self.n_numeric:
            raise ValueError(f"num must have shape (B, {self.n_numeric}), got {tuple(num.shape)}")
        parts = self.embed_categorical(cat)
        if self.n_numeric:
            dtype = parts[0].dtype if parts else torch.get_default_dtype()
            parts.append(num.to(dtype))
        if not parts:
            return num.new_zeros((cat.shape[0], 0))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"n_categorical={self.n_categorical}, n_numeric={self.n_numeric}, output_dim={self.output_dim}"
