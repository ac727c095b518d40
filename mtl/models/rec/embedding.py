"""Input layer of the rec models: categorical embeddings concatenated with numeric features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl.data.spec import FeatureSpec
from mtl.moe.routing import bin_counts

MAX_FOLD_BUCKETS = 4
"""Padding buckets per table: enough to keep one or two large vocabularies
(user and item ids) in buckets of their own, which then stay unfolded."""


@dataclass(frozen=True)
class _FoldPlan:
    """Index tensors that fold some buckets of a table and gather the rest.

    Attributes:
        fold_pos: positions (in the table's columns) of the folded features; None
            when every feature of the table folds.
        bag_offsets: each folded feature's first row in the compacted projected rows.
        pad_rows: the table rows to project, bucket after bucket.
        buckets: per folded bucket, ``(positions, features, padded rows)``.
        plain_pos: positions of the gathered features.
        plain_offsets: their row offsets in the table.
        w_rows: rows of the table's weight block that the gathered features multiply.
    """

    fold_pos: torch.Tensor | None
    bag_offsets: torch.Tensor
    pad_rows: torch.Tensor
    buckets: tuple[tuple[torch.Tensor, int, int], ...]
    plain_pos: torch.Tensor
    plain_offsets: torch.Tensor
    w_rows: torch.Tensor


class _GatherRows(torch.autograd.Function):
    """``weight[idx]`` whose backward is one ``index_add_``.

    Same values and gradients as ``F.embedding``; on CPU its backward
    (``embedding_dense_backward``) is several times slower than ``index_add_``
    for the few-hundred-row tables and ``B * F`` lookups of tabular batches.
    """

    @staticmethod
    def forward(ctx, weight_VD: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.num_rows = weight_VD.shape[0]
        return F.embedding(idx, weight_VD)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        d = grad.shape[-1]
        grad_VD = grad.new_zeros(ctx.num_rows, d)
        return grad_VD.index_add_(0, idx.reshape(-1), grad.reshape(-1, d)), None


def _row_buckets(counts: list[int], max_buckets: int) -> list[list[int]]:
    """Split positions into at most ``max_buckets`` groups minimising padded rows.

    Each group is padded to its largest count; groups are runs of the positions
    sorted by count, chosen by dynamic programming over the split points.

    Example:
        >>> _row_buckets([50, 3, 4, 52, 2], max_buckets=2)
        [[4, 1, 2], [0, 3]]
    """
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    c = [counts[i] for i in order]
    n = len(c)
    inf = float("inf")
    # best[k][j]: least padded rows covering the first j sorted positions with k groups
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[k - 1][i] + (j - i) * c[j - 1]
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_buckets + 1), key=lambda kk: (best[kk][n], kk))
    groups, j = [], n
    while k > 0 and j > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def _offsets_of(counts: list[int]) -> list[int]:
    """Start of each block when blocks of ``counts`` rows are stacked."""
    out, start = [], 0
    for n in counts:
        out.append(start)
        start += n
    return out


class _BagSum(torch.autograd.Function):
    """``sum_f P[rows[:, f]]``: ``(V, N), (B, F) -> (B, N)``, and its transpose as the backward.

    The gradient of ``P`` is the same kind of sum the other way round: row ``v``
    sums the output gradients of the samples that looked it up. Sorting the
    ``B * F`` lookups by row turns it into one ``embedding_bag`` with ``V``
    bags over the ``(B, N)`` gradient. ``F.embedding_bag``'s own backward goes
    through ``embedding_dense_backward``, one ``index_add_`` per feature reads
    the whole gradient ``F`` times, and expanding it to ``B * F`` rows allocates
    ``F`` times the output: on Census (``F = 32``, ``N = 536``) the sorted bag
    takes about a third of the time of the per-feature ``index_add_`` loop.
    """

    @staticmethod
    def forward(ctx, p_VN: torch.Tensor, rows_BF: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows_BF)
        ctx.num_rows = p_VN.shape[0]
        return F.embedding_bag(rows_BF, p_VN, mode="sum")

    @staticmethod
    def backward(ctx, grad_BN: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (rows_BF,) = ctx.saved_tensors
        n_features = rows_BF.shape[1]
        rows = rows_BF.reshape(-1)  # lookup i belongs to sample i // F
        # the order inside a bag only changes the summation order: no stable sort needed;
        # narrow keys sort faster (int16: ~0.15 ms against ~0.3 ms for int64 on Census)
        keys = rows.to(torch.int16 if ctx.num_rows <= torch.iinfo(torch.int16).max else torch.int32)
        order = torch.sort(keys).indices
        counts_V = bin_counts(rows, ctx.num_rows)
        starts_V = counts_V.cumsum(0) - counts_V
        samples = torch.div(order, n_features, rounding_mode="floor")
        grad_VN = F.embedding_bag(samples, grad_BN.contiguous(), starts_V, mode="sum")
        return grad_VN, None


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

    Args:
        spec: the fitted :class:`~mtl.data.spec.FeatureSpec`.
        init_std: std of the normal initialisation of the embedding tables (small,
            as usual for sparse-feature models, so no field dominates at the start).
        fold: let :meth:`project` fold small vocabularies into the weight it
            multiplies (see :meth:`bucket_folds`); False always gathers.

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
        >>> emb(torch.tensor([[3], [0]]), torch.zeros(2, 1)).shape, emb.output_dim
        (torch.Size([2, 5]), 5)
    """

    def __init__(self, *, spec: FeatureSpec, init_std: float = 0.01, fold: bool = True) -> None:
        super().__init__()
        self.fold = fold
        self.spec = spec
        self.n_categorical = spec.n_categorical
        self.n_numeric = spec.n_numeric
        self._output_dim = sum(f.embed_dim for f in spec.categorical) + spec.n_numeric
        widths = sorted({f.embed_dim for f in spec.categorical})
        self.tables = nn.ModuleList()
        self._columns: list[list[int]] = []  # per table: its features' column indices
        slots: dict[int, tuple[int, int, int]] = {}  # feature: (table, row offset, rows)
        for t, width in enumerate(widths):
            cols = [j for j, f in enumerate(spec.categorical) if f.embed_dim == width]
            counts = [spec.categorical[j].vocab_size + 1 for j in cols]
            offsets = _offsets_of(counts)
            slots.update({j: (t, o, n) for j, o, n in zip(cols, offsets, counts, strict=True)})
            table = nn.Embedding(sum(counts), width)
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)
            self._columns.append(cols)
            self.register_buffer(f"offsets_{t}", torch.tensor(offsets), persistent=False)
            self.register_buffer(
                f"limits_{t}",
                torch.tensor([spec.categorical[j].vocab_size for j in cols]),
                persistent=False,
            )
        self._slot = [slots[j] for j in range(spec.n_categorical)]
        # column of each feature's first unit in the concatenated output
        starts = [0]
        for f in spec.categorical:
            starts.append(starts[-1] + f.embed_dim)
        self._cat_width = starts[-1]
        self._w_span: list[tuple[int, int] | None] = []  # table's columns, if contiguous
        self._buckets: list[list[tuple[list[int], int, int]]] = []  # (positions, R_b, base)
        self._plans: dict[tuple[int, tuple[bool, ...], torch.device], _FoldPlan] = {}
        self._padded_rows: list[int] = []  # sum of F_b * R_b
        for t, cols in enumerate(self._columns):
            self._register_fold_layout(t, cols, starts)
        # Output in spec order; when every feature has one width this is the identity.
        order = [j for cols in self._columns for j in cols]
        self._in_spec_order = order == list(range(spec.n_categorical))

    def _register_fold_layout(self, t: int, cols: list[int], starts: list[int]) -> None:
        """Buffers :meth:`project` needs to fold table ``t``.

        Folding projects padded ``(F_b, R_b, d)`` views of the table, one batched
        matmul per bucket of features with similar row counts (``R_b`` the
        bucket's largest), so that a few large vocabularies do not pad all the
        others.
        """
        width = self.spec.categorical[cols[0]].embed_dim
        w_rows = [starts[j] + i for j in cols for i in range(width)]
        self.register_buffer(f"w_rows_{t}", torch.tensor(w_rows), persistent=False)
        contiguous = w_rows == list(range(w_rows[0], w_rows[0] + len(w_rows)))
        self._w_span.append((w_rows[0], w_rows[-1] + 1) if contiguous else None)
        counts = [self.spec.categorical[j].vocab_size + 1 for j in cols]
        offsets = _offsets_of(counts)
        pad: list[int] = []
        buckets = []
        for positions in _row_buckets(counts, max_buckets=MAX_FOLD_BUCKETS):
            r_b = max(counts[i] for i in positions)
            base = len(pad)
            for i in positions:
                # slots past a feature's rows repeat its row 0 (projected, never looked up)
                pad += [offsets[i] + (r if r < counts[i] else 0) for r in range(r_b)]
            buckets.append((positions, r_b, base))
        self._buckets.append(buckets)
        self._padded_rows.append(len(pad))
        self.register_buffer(f"pad_rows_{t}", torch.tensor(pad), persistent=False)
        for b, (positions, _, _) in enumerate(buckets):
            self.register_buffer(f"bucket_{t}_{b}", torch.tensor(positions), persistent=False)

    @property
    def output_dim(self) -> int:
        """Width ``D_in`` of the concatenated output."""
        return self._output_dim

    def feature_weight(self, j: int) -> torch.Tensor:
        """``(vocab_size + 1, embed_dim)`` rows of categorical feature ``j`` (a view)."""
        t, start, n = self._slot[j]
        return self.tables[t].weight[start : start + n]

    def _check_range(self, t: int, idx_BF: torch.Tensor) -> None:
        limits = getattr(self, f"limits_{t}")
        bad_F = ((idx_BF < 0) | (idx_BF > limits)).any(0)
        if idx_BF.is_cuda:
            # no host sync in the hot path on GPU: the check fails asynchronously
            torch._assert_async(~bad_F.any(), "categorical index outside [0, vocab_size]")
        elif bad_F.any():
            f = self.spec.categorical[self._columns[t][int(bad_F.nonzero()[0])]]
            raise IndexError(
                f"categorical feature {f.name!r} has an index outside [0, {f.vocab_size}]"
            )

    def embed_categorical(self, cat: torch.Tensor) -> list[torch.Tensor]:
        """Per categorical feature, its (B, embed_dim) embedding."""
        parts: list[torch.Tensor] = [cat.new_empty(0)] * self.n_categorical
        for t, cols in enumerate(self._columns):
            emb_BFd = self._gather(t, cat[:, cols])
            for i, j in enumerate(cols):
                parts[j] = emb_BFd[:, i]
        return parts

    def _gather(self, t: int, idx_BF: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """(B, F_t) per-feature indices -> (B, F_t, width) from table ``t``."""
        if check:
            self._check_range(t, idx_BF)
        rows = idx_BF + getattr(self, f"offsets_{t}")
        weight = self.tables[t].weight
        if weight.device.type == "cpu":
            return _GatherRows.apply(weight, rows)
        return F.embedding(rows, weight)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """(B, F_c) int64, (B, F_n) float -> (B, D_in)."""
        if cat.ndim != 2 or cat.shape[1] != self.n_categorical:
            raise ValueError(
                f"cat must have shape (B, {self.n_categorical}), got {tuple(cat.shape)}"
            )
        if num.ndim != 2 or num.shape[1] != self.n_numeric:
            raise ValueError(f"num must have shape (B, {self.n_numeric}), got {tuple(num.shape)}")
        B = cat.shape[0]
        if self._in_spec_order:
            parts = [
                self._gather(t, cat if len(self.tables) == 1 else cat[:, cols]).reshape(B, -1)
                for t, cols in enumerate(self._columns)
            ]
        else:
            parts = self.embed_categorical(cat)
        if self.n_numeric:
            dtype = parts[0].dtype if parts else torch.get_default_dtype()
            parts.append(num.to(dtype))
        if not parts:
            return num.new_zeros((B, 0))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def folds(self, batch_size: int) -> list[bool]:
        """Per table, whether :meth:`project` folds any of it for batches of ``batch_size`` rows."""
        return [any(self.bucket_folds(t, batch_size)) for t in range(len(self.tables))]

    def bucket_folds(self, t: int, batch_size: int) -> tuple[bool, ...]:
        """Per padding bucket of table ``t``, whether :meth:`project` folds it.

        Folding a bucket of ``F`` width-``d`` features padded to ``R`` rows
        projects ``F * R * d * N`` multiply-adds and sums ``F`` projected rows per
        sample (``B * F * N``), instead of multiplying ``B`` gathered ``F * d``-wide
        rows (``B * F * d * N``): it pays when ``R * d < B * (d - 1)``. Large
        vocabularies (ids) sit in buckets of their own and stay gathered.
        """
        width = self.tables[t].embedding_dim
        return tuple(
            self.fold and r_b * width < batch_size * (width - 1) for _, r_b, _ in self._buckets[t]
        )

    def _fold_plan(self, t: int, flags: tuple[bool, ...]) -> _FoldPlan:
        """The index tensors for folding the flagged buckets of table ``t`` (cached)."""
        device = self.tables[t].weight.device
        key = (t, flags, device)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        width = self.tables[t].embedding_dim
        n_cols = len(self._columns[t])
        offsets = getattr(self, f"offsets_{t}").tolist()
        pad_all = getattr(self, f"pad_rows_{t}")
        bag_offset: dict[int, int] = {}  # folded feature: its first projected row
        pad_parts: list[torch.Tensor] = []
        buckets = []
        start = 0
        for (positions, r_b, base), fold in zip(self._buckets[t], flags, strict=True):
            if not fold:
                continue
            n = len(positions)
            bag_offset.update({i: start + k * r_b for k, i in enumerate(positions)})
            pad_parts.append(pad_all[base : base + n * r_b])
            buckets.append((torch.tensor(positions, device=device), n, r_b))
            start += n * r_b
        # folded features in column order: when all fold, the indices need no gather
        fold_pos = sorted(bag_offset)
        plain = [i for i in range(n_cols) if i not in bag_offset]

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        plan = _FoldPlan(
            fold_pos=None if not plain else as_tensor(fold_pos),
            bag_offsets=as_tensor([bag_offset[i] for i in fold_pos]),
            pad_rows=torch.cat(pad_parts) if pad_parts else as_tensor([]),
            buckets=tuple(buckets),
            plain_pos=as_tensor(plain),
            plain_offsets=as_tensor([offsets[i] for i in plain]),
            w_rows=as_tensor([i * width + c for i in plain for c in range(width)]),
        )
        self._plans[key] = plan
        return plan

    def project(self, cat: torch.Tensor, num: torch.Tensor, w_DN: torch.Tensor) -> torch.Tensor:
        """``forward(cat, num) @ w_DN`` in float32, without forming the embedded input.

        Features in the padding buckets that :meth:`bucket_folds` picks have their
        rows multiplied by their blocks of ``w_DN`` once (one batched matmul per
        bucket) and each sample sums its projected rows; the other features are
        gathered and multiplied as usual. The result and its gradients equal the
        plain product's up to float rounding.

        Args:
            cat: ``(B, F_c)`` int64 indices.
            num: ``(B, F_n)`` float.
            w_DN: ``(D_in, N)`` weight over the concatenated input.

        Returns:
            ``(B, N)`` float32.
        """
        if w_DN.dim() != 2 or w_DN.shape[0] != self.output_dim:
            raise ValueError(f"weight must be ({self.output_dim}, N), got {tuple(w_DN.shape)}")
        B = cat.shape[0]
        with torch.autocast(device_type=cat.device.type, enabled=False):
            w_DN = w_DN.float()
            # split, not slices: a slice's backward zero-fills a gradient of w_DN's full size
            w_cat, w_num = w_DN.split([self._cat_width, self.n_numeric])
            z_BN: torch.Tensor | None = None
            idx, plans = self._checked_indices_and_plans(cat)
            for t, (idx_BF, plan) in enumerate(zip(idx, plans, strict=True)):
                span = self._w_span[t]
                if span == (0, self._cat_width):
                    w_XN = w_cat
                elif span:
                    w_XN = w_cat[span[0] : span[1]]
                else:
                    w_XN = w_cat[getattr(self, f"w_rows_{t}")]
                if plan is None:
                    part = self._gather(t, idx_BF, check=False).reshape(B, -1).float() @ w_XN
                else:
                    part = self._project_folded(t, idx_BF, w_XN, plan)
                z_BN = part if z_BN is None else z_BN + part
            if self.n_numeric:
                z_BN = num.float() @ w_num if z_BN is None else z_BN.addmm_(num.float(), w_num)
        if z_BN is None:
            return w_DN.new_zeros(B, w_DN.shape[1])
        return z_BN

    # Eager under torch.compile: the range check branches on the data and the plans
    # come from a cache; kept out of project's loop, they break the graph once, not
    # per table (a break inside a loop makes dynamo give up on the whole frame).
    @torch.compiler.disable
    def _checked_indices_and_plans(
        self, cat: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[_FoldPlan | None]]:
        """Per table: its ``(B, F_t)`` index columns (range-checked) and its fold plan, or None."""
        idx: list[torch.Tensor] = []
        plans: list[_FoldPlan | None] = []
        for t, cols in enumerate(self._columns):
            idx_BF = cat if len(self._columns) == 1 else cat[:, cols]
            self._check_range(t, idx_BF)
            flags = self.bucket_folds(t, cat.shape[0])
            idx.append(idx_BF)
            plans.append(self._fold_plan(t, flags) if any(flags) else None)
        return idx, plans

    def _project_folded(
        self, t: int, idx_BF: torch.Tensor, w_XN: torch.Tensor, plan: _FoldPlan
    ) -> torch.Tensor:
        """Table ``t``'s share of ``x @ w``: folded buckets summed, the other features gathered.

        Each folded bucket's padded ``(F_b, R_b, d)`` rows are multiplied by its
        features' blocks of ``w`` in one batched matmul; each sample then sums
        its ``F`` projected rows.
        """
        width = self.tables[t].embedding_dim
        weight = self.tables[t].weight
        F_t = len(self._columns[t])
        w_FdN = w_XN.view(F_t, width, -1)
        padded = _GatherRows.apply(weight.float(), plan.pad_rows)
        parts, start = [], 0
        for positions, n, r_b in plan.buckets:
            w_b = w_FdN if n == F_t else w_FdN.index_select(0, positions)
            x_b = padded[start : start + n * r_b].view(n, r_b, width)
            parts.append(torch.bmm(x_b, w_b).view(n * r_b, -1))
            start += n * r_b
        projected = parts[0] if len(parts) == 1 else torch.cat(parts)
        if plan.fold_pos is None:
            return _BagSum.apply(projected, idx_BF + plan.bag_offsets)
        z_BN = _BagSum.apply(projected, idx_BF[:, plan.fold_pos] + plan.bag_offsets)
        rows = idx_BF[:, plan.plain_pos] + plan.plain_offsets
        x_plain = _GatherRows.apply(weight, rows).reshape(idx_BF.shape[0], -1).float()
        return z_BN.addmm_(x_plain, w_XN.index_select(0, plan.w_rows))

    def lazy(self, cat: torch.Tensor, num: torch.Tensor) -> EmbeddedInput:
        """The embedded batch as a :class:`~mtl.moe.linear_input.LinearInput`."""
        return EmbeddedInput(self, cat, num)

    def extra_repr(self) -> str:
        return f"n_categorical={self.n_categorical}, n_numeric={self.n_numeric}, output_dim={self.output_dim}"


@dataclass(frozen=True)
class EmbeddedInput:
    """An embedded batch known through its products: a :class:`~mtl.moe.linear_input.LinearInput`.

    ``matmul(w)`` is :meth:`FeatureEmbedding.project` (folded where that is
    cheaper); ``materialize()`` is the embedding's forward.

    Example:
        >>> from mtl.data.spec import CategoricalFeature, TaskSpec
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)], numeric=[],
        ...     tasks=[TaskSpec("click", "binary")])
        >>> emb = FeatureEmbedding(spec=spec)
        >>> cat, num, w = torch.tensor([[3], [7]]), torch.zeros(2, 0), torch.randn(4, 6)
        >>> torch.allclose(emb.lazy(cat, num).matmul(w), emb(cat, num) @ w)
        True
    """

    embedding: FeatureEmbedding
    cat: torch.Tensor
    num: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.cat.shape[0])

    @property
    def width(self) -> int:
        return self.embedding.output_dim

    @property
    def device(self) -> torch.device:
        return self.cat.device

    def matmul(self, w_DN: torch.Tensor) -> torch.Tensor:
        return self.embedding.project(self.cat, self.num, w_DN)

    def materialize(self) -> torch.Tensor:
        return self.embedding(self.cat, self.num)
