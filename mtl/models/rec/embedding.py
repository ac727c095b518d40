"""Input layer of the rec models: categorical embeddings concatenated with numeric features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.data.spec import FeatureSpec


class FeatureEmbedding(nn.Module):
    """Embed the categorical features and concatenate them with the numeric ones.

    Each categorical feature owns ``vocab_size + 1`` rows; row 0 of a feature
    is its OOV / unseen / null category. It is a trained row, not padding: train
    rows with nulls or rare categories teach it what "unknown" means, which is
    what validation/test rows with unseen categories then get. Numeric features
    arrive standardised by the data layer and pass through unchanged.

    Features of the same width share one table (their rows stacked, each
    feature's index shifted by its offset), so a batch costs one gather and one
    gradient scatter per width instead of one per feature.
    :meth:`feature_weight` gives one feature's rows.

    :meth:`project` computes ``forward(cat, num) @ w`` without forming the
    embedded batch, folding small tables into ``w`` (:meth:`folds`).

    Args:
        spec: the fitted :class:`~mtl.data.spec.FeatureSpec`.
        init_std: std of the normal initialisation of the embedding tables (small,
            as usual for sparse-feature models, so no field dominates at the start).
        fold: let :meth:`project` fold the tables for which it pays; False always gathers.

    Shapes:
        - ``cat``: (B, F_c) int64 indices in ``[0, vocab_size]`` per column.
        - ``num``: (B, F_n) float.
        - output: (B, D_in) with ``D_in = sum(embed_dim) + F_n`` (:attr:`output_dim`),
          in spec order: categorical embeddings first, then numeric values.

    Example:
        >>> from mtl.data.spec import CategoricalFeature, NumericFeature, TaskSpec
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)],
        ...     numeric=[NumericFeature("price", 0.0, 1.0)], tasks=[TaskSpec("click", "binary")])
        >>> emb = FeatureEmbedding(spec=spec)
        >>> cat, num = torch.tensor([[3], [0]]), torch.zeros(2, 1)
        >>> emb(cat, num).shape, emb.output_dim
        (torch.Size([2, 5]), 5)
        >>> w = torch.randn(5, 3)
        >>> torch.allclose(emb.project(cat, num, w), emb(cat, num) @ w)
        True
    """

    def __init__(self, *, spec: FeatureSpec, init_std: float = 0.01, fold: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.fold = fold
        self.n_categorical = spec.n_categorical
        self.n_numeric = spec.n_numeric
        widths = [f.embed_dim for f in spec.categorical]
        self._cat_width = sum(widths)
        self._output_dim = self._cat_width + spec.n_numeric
        starts = [sum(widths[:j]) for j in range(len(widths))]  # each feature's first column
        self.tables = nn.ModuleList()
        self._features: list[list[int]] = []  # per table: its features, in spec order
        self._rows_per_feature: list[int] = []  # per table: rows of its largest feature
        self._slot: dict[int, tuple[int, int, int]] = {}  # feature: (table, first row, rows)
        columns: list[int] = []  # the output's columns, table after table
        for t, width in enumerate(sorted(set(widths))):
            features = [j for j, w in enumerate(widths) if w == width]
            counts = [spec.categorical[j].vocab_size + 1 for j in features]
            offsets = [sum(counts[:i]) for i in range(len(counts))]
            self._slot.update(
                {j: (t, o, n) for j, o, n in zip(features, offsets, counts, strict=True)}
            )
            table = nn.Embedding(sum(counts), width)
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)
            self._features.append(features)
            columns += [starts[j] + c for j in features for c in range(width)]
            rows = max(counts)
            self._rows_per_feature.append(rows)
            self.register_buffer(f"offsets_{t}", torch.tensor(offsets), persistent=False)
            self.register_buffer(f"limits_{t}", torch.tensor(counts) - 1, persistent=False)
            # each feature padded to `rows` rows with copies of its row 0 (projected, not looked up)
            padded = [
                o + (r if r < n else 0)
                for o, n in zip(offsets, counts, strict=True)
                for r in range(rows)
            ]
            self.register_buffer(f"padded_rows_{t}", torch.tensor(padded), persistent=False)
        # x_spec = x_tables[:, spec_columns], and x_spec @ w = x_tables @ w[table_columns]
        self._in_spec_order = columns == list(range(self._cat_width))
        self.register_buffer(
            "table_columns", torch.tensor(columns, dtype=torch.long), persistent=False
        )
        self.register_buffer("spec_columns", torch.argsort(self.table_columns), persistent=False)

    @property
    def output_dim(self) -> int:
        """Width ``D_in`` of the concatenated output."""
        return self._output_dim

    def feature_weight(self, j: int) -> torch.Tensor:
        """``(vocab_size + 1, embed_dim)`` rows of categorical feature ``j`` (a view)."""
        t, start, n = self._slot[j]
        return self.tables[t].weight[start : start + n]

    def folds(self, batch_size: int) -> list[bool]:
        """Per table, whether :meth:`project` folds it for batches of ``batch_size`` rows.

        Folding a table of ``F`` width-``d`` features padded to ``V`` rows each
        projects ``F * V * d * X`` multiply-adds and sums ``F`` projected rows
        per sample (``B * F * X``), instead of multiplying ``B`` gathered
        ``F * d``-wide rows (``B * F * d * X``): it pays when ``V * d < B * (d - 1)``.
        A table holding a large vocabulary (ids) stays gathered; give ids their
        own embedding width to keep the small fields folding.
        """
        return [
            self.fold and rows * table.embedding_dim < batch_size * (table.embedding_dim - 1)
            for rows, table in zip(self._rows_per_feature, self.tables, strict=True)
        ]

    def _check_shapes(self, cat: torch.Tensor, num: torch.Tensor) -> None:
        if cat.ndim != 2 or cat.shape[1] != self.n_categorical:
            raise ValueError(
                f"cat must have shape (B, {self.n_categorical}), got {tuple(cat.shape)}"
            )
        if num.ndim != 2 or num.shape[1] != self.n_numeric:
            raise ValueError(f"num must have shape (B, {self.n_numeric}), got {tuple(num.shape)}")

    # Eager under torch.compile: the check branches on the data; one graph break
    # here, before the per-table loops, rather than one per table.
    @torch.compiler.disable
    def _table_indices(self, cat: torch.Tensor) -> list[torch.Tensor]:
        """Per table, its ``(B, F_t)`` index columns, range-checked (a shared table
        would otherwise read another feature's rows)."""
        out = []
        for t, features in enumerate(self._features):
            idx_BF = cat if len(self._features) == 1 else cat[:, features]
            bad_F = ((idx_BF < 0) | (idx_BF > getattr(self, f"limits_{t}"))).any(0)
            if idx_BF.is_cuda:
                # no host sync in the hot path on GPU: the check fails asynchronously
                torch._assert_async(~bad_F.any(), "categorical index outside [0, vocab_size]")
            elif bad_F.any():
                f = self.spec.categorical[features[int(bad_F.nonzero()[0])]]
                raise IndexError(
                    f"categorical feature {f.name!r} has an index outside [0, {f.vocab_size}]"
                )
            out.append(idx_BF)
        return out

    def _gather(self, t: int, idx_BF: torch.Tensor) -> torch.Tensor:
        """``(B, F_t)`` indices -> ``(B, F_t * d)`` rows of table ``t``, feature after feature."""
        rows = (idx_BF + getattr(self, f"offsets_{t}")).reshape(-1)
        # index_select, not F.embedding: its backward is one index_add_ (embedding's is slow on CPU)
        return self.tables[t].weight.index_select(0, rows).view(idx_BF.shape[0], -1)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """(B, F_c) int64, (B, F_n) float -> (B, D_in)."""
        self._check_shapes(cat, num)
        idx = self._table_indices(cat)
        parts = [self._gather(t, idx_BF) for t, idx_BF in enumerate(idx)]
        if len(parts) > 1:
            x_cat = torch.cat(parts, dim=1)
            parts = [x_cat if self._in_spec_order else x_cat.index_select(1, self.spec_columns)]
        if self.n_numeric:
            parts.append(num.to(parts[0].dtype if parts else torch.get_default_dtype()))
        if not parts:
            return num.new_zeros((cat.shape[0], 0))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def project(self, cat: torch.Tensor, num: torch.Tensor, w_DX: torch.Tensor) -> torch.Tensor:
        """``forward(cat, num) @ w_DX`` in float32, without forming the embedded batch.

        ``x @ w`` over concatenated embeddings is ``sum_f table_f[i_f] @ w_f``.
        A table that :meth:`folds` has each feature's rows multiplied by its
        block ``w_f`` once (one batched matmul), and each sample sums its
        projected rows (``embedding_bag``); other tables are gathered and
        multiplied. Values and gradients equal the plain product's up to
        float rounding.

        Args:
            cat: ``(B, F_c)`` int64 indices.
            num: ``(B, F_n)`` float.
            w_DX: ``(D_in, X)`` weight over the concatenated input.

        Returns:
            ``(B, X)`` float32.
        """
        self._check_shapes(cat, num)
        if w_DX.dim() != 2 or w_DX.shape[0] != self.output_dim:
            raise ValueError(f"weight must be ({self.output_dim}, N), got {tuple(w_DX.shape)}")
        idx = self._table_indices(cat)
        folds = self.folds(cat.shape[0])
        with torch.autocast(device_type=cat.device.type, enabled=False):
            # split, not slices: a slice's backward zero-fills a gradient of w_DX's full size
            w_cat, w_num = w_DX.float().split([self._cat_width, self.n_numeric])
            if not self._in_spec_order:
                w_cat = w_cat.index_select(0, self.table_columns)
            sizes = [
                len(f) * table.embedding_dim
                for f, table in zip(self._features, self.tables, strict=True)
            ]
            z_BX = num.float() @ w_num
            # w_table_DX: the rows of w that table t's columns of the input meet
            for t, (idx_BF, w_table_DX) in enumerate(zip(idx, w_cat.split(sizes), strict=True)):
                if folds[t]:
                    z_BX = z_BX + self._folded(t, idx_BF, w_table_DX)
                else:
                    z_BX = z_BX + self._gather(t, idx_BF).float() @ w_table_DX
        return z_BX

    def _folded(self, t: int, idx_BF: torch.Tensor, w_table_DX: torch.Tensor) -> torch.Tensor:
        """Table ``t``'s share of ``x @ w``: project its padded rows, then bag-sum per sample.

        ``w_table_DX`` is ``(F * D, X)``: each of the table's ``F`` features has
        ``V`` (padded) rows of width ``D`` and meets its own ``(D, X)`` block.
        """
        table, V = self.tables[t], self._rows_per_feature[t]
        F_t, D = len(self._features[t]), table.embedding_dim
        rows_FVD = table.weight.float().index_select(0, getattr(self, f"padded_rows_{t}"))
        projected_FVX = torch.bmm(rows_FVD.view(F_t, V, D), w_table_DX.view(F_t, D, -1))
        bag_rows_BF = idx_BF + torch.arange(F_t, device=idx_BF.device) * V
        return F.embedding_bag(bag_rows_BF, projected_FVX.view(F_t * V, -1), mode="sum")

    def extra_repr(self) -> str:
        return f"n_categorical={self.n_categorical}, n_numeric={self.n_numeric}, output_dim={self.output_dim}"
