"""Lightning data module for multi-task ranking: source -> split -> fit spec on train -> tensors.

The split is a pure function of the row count and ``split_seed`` (default: ``seed``), so
two runs with the same seed train and evaluate on the same rows; the comparison
tooling relies on that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import polars as pl
import pytorch_lightning as L

from mtl.data.data_record import describe_split, label_rates
from mtl.data.data_warnings import warn_one_class_labels, warn_unseen_categories
from mtl.data.features import ColumnRoles, FeatureSpec, FittedFeatures, TaskKind, fit_features
from mtl.data.sources import SourceData, load_source
from mtl.data.tabular import TabularTensors, encode
from mtl.data.tensor_loader import TensorBatchLoader
from mtl.data.validation import check_embed_dim, check_unique

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Deterministic random partition of ``range(n)`` into parts of the given fractions.

    Part sizes are ``round`` of the cumulative fractions, so they sum to ``n``;
    indices inside each part are sorted (file order).

    Example:
        >>> [len(p) for p in split_indices(10, (0.8, 0.1, 0.1), seed=0)]
        [8, 1, 1]
    """
    fracs = np.asarray(list(fractions), dtype=np.float64)
    if fracs.ndim != 1 or (fracs < 0).any() or not np.isclose(fracs.sum(), 1.0, atol=1e-6):
        raise ValueError(
            f"split fractions must be non-negative and sum to 1, got {list(fractions)}"
        )
    bounds = np.round(np.cumsum(fracs) * n).astype(np.int64)
    bounds[-1] = n
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.split(perm, bounds[:-1])]


def _take(df: pl.DataFrame, index: np.ndarray) -> pl.DataFrame:
    return df[pl.Series(index, dtype=pl.Int64)]


class RecDataModule(L.LightningDataModule):
    """Tabular multi-task data for the rec models (MMoE, PLE, HoME, ...).

    Splitting: if the source provides its own test rows (and ``use_source_test``),
    they are the test split and validation is carved out of the source's train rows
    with fraction ``split[1] / (split[0] + split[1])``; a source validation split is
    used as is; otherwise the train rows are split ``split`` = (train, val, test).
    The feature spec (vocabularies, numeric statistics) is fitted on train only.

    Args:
        source: registry name (see :data:`mtl.data.sources.SOURCES`).
        source_kwargs: keyword arguments of the source loader.
        path: shortcut for ``source_kwargs["path"]`` (file-based sources).
        split: (train, val, test) fractions.
        use_source_test: use the source's own val/test rows when it has them.
        seed: shuffling seed of the train loader, and split seed unless ``split_seed``.
        split_seed: seed of the split, to keep one split across training seeds.
        batch_size: train batch size.
        eval_batch_size: val/test batch size (default: ``batch_size``).
        drop_last: drop the last incomplete train batch.
        categorical: override the source's categorical columns.
        numeric: override the source's numeric columns.
        labels: override the tasks: a list of the source's label names (a subset,
            in the wanted order) or a mapping name -> ``"binary"``/``"regression"``.
        user_column: override the source's user column.
        embed_dim: fixed embedding width for all categorical features, or None for the
            ``min(max_embed_dim, 6 * vocab**0.25)`` rule.
        max_embed_dim: cap of that rule.
        min_count: categories seen fewer times in train map to OOV.
        max_vocab: keep at most this many categories per column (the most frequent), or None.
        task_weights: loss weight per task name (default 1.0).

    Example:
        >>> dm = RecDataModule(source="synthetic_ctr", source_kwargs={"n": 2000, "n_users": 50,
        ...     "n_items": 40}, batch_size=256)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.cat.shape[1] == dm.spec.n_categorical, batch.labels.shape
        (True, torch.Size([256, 3]))
    """

    def __init__(
        self,
        *,
        source: str,
        source_kwargs: Mapping[str, Any] | None = None,
        path: str | None = None,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        use_source_test: bool = True,
        seed: int = 0,
        split_seed: int | None = None,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        categorical: Sequence[str] | None = None,
        numeric: Sequence[str] | None = None,
        labels: Sequence[str] | Mapping[str, TaskKind] | None = None,
        user_column: str | None = None,
        embed_dim: int | None = None,
        max_embed_dim: int = 16,
        min_count: int = 1,
        task_weights: Mapping[str, float] | None = None,
        max_vocab: int | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.source_kwargs = dict(source_kwargs or {})
        if path is not None:
            self.source_kwargs["path"] = path
        self.split = tuple(float(f) for f in split)
        if len(self.split) != 3:
            raise ValueError(f"split must be (train, val, test) fractions, got {list(split)}")
        split_indices(0, self.split, 0)  # validates the fractions early
        self.use_source_test = use_source_test
        self.seed = seed
        self.split_seed = seed if split_seed is None else split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.drop_last = drop_last
        check_embed_dim(embed_dim)
        check_embed_dim(max_embed_dim, key="max_embed_dim", allow_none=False)
        for key, names in (("labels", labels), ("categorical", categorical), ("numeric", numeric)):
            if names is not None and not isinstance(names, Mapping):
                check_unique(names, key=key)
        self._overrides = {
            "categorical": None if categorical is None else list(categorical),
            "numeric": None if numeric is None else list(numeric),
            "labels": None
            if labels is None
            else (dict(labels) if isinstance(labels, Mapping) else list(labels)),
            "user_column": user_column,
        }
        self._fit_kwargs = {
            "embed_dim": embed_dim,
            "max_embed_dim": max_embed_dim,
            "min_count": min_count,
            "max_vocab": max_vocab,
            "task_weights": None if task_weights is None else dict(task_weights),
        }
        self._fitted: FittedFeatures | None = None
        self._tensors: dict[Split, TabularTensors] = {}
        self.row_index: dict[Split, np.ndarray] = {}
        """Per split, row positions in the source frame it came from (``origin[split]``)."""
        self.origin: dict[Split, str] = {}
        # What the source read and which of its own splits were used: the run's data record.
        self._source_files: dict[str, list[str]] = {}
        self._source_head = ""
        self._given: list[Split] = []
        self._unused: list[Split] = []

    # ----------------------------------------------------------------- preparation
    def _roles(self, data: SourceData) -> ColumnRoles:
        roles, o = data.roles, self._overrides
        labels: dict[str, TaskKind] = dict(roles.labels)
        if isinstance(o["labels"], dict):
            labels = o["labels"]
        elif isinstance(o["labels"], list):
            unknown = [name for name in o["labels"] if name not in roles.labels]
            if unknown:
                raise ValueError(
                    f"labels {unknown} are not labels of source {self.source!r} ({list(roles.labels)})"
                )
            labels = {name: roles.labels[name] for name in o["labels"]}
        return ColumnRoles(
            categorical=roles.categorical if o["categorical"] is None else o["categorical"],
            numeric=roles.numeric if o["numeric"] is None else o["numeric"],
            labels=labels,
            user_column=o["user_column"] or roles.user_column,
        )

    def _split(self, data: SourceData) -> dict[Split, pl.DataFrame]:
        train_frac, val_frac, test_frac = self.split
        given: dict[Split, pl.DataFrame] = {}
        if self.use_source_test and data.val is not None:
            given["val"] = data.val
        if self.use_source_test and data.test is not None:
            given["test"] = data.test
        n = data.train.height
        self._source_files = {k: list(v) for k, v in data.files.items()}
        self._source_head = data.description or f"{self.source}: the rows"
        self._given = [s for s in SPLITS if s in given]
        self._unused = [
            s for s in ("val", "test") if getattr(data, s) is not None and s not in given
        ]
        parts: dict[Split, np.ndarray]
        if len(given) == 2:
            parts = {"train": np.arange(n)}
        elif len(given) == 1:
            # Carve the missing split out of train, keeping its requested ratio to train.
            carve: Split = "test" if "val" in given else "val"
            carve_frac = val_frac if carve == "val" else test_frac
            frac = carve_frac / (train_frac + carve_frac)
            keep, carved = split_indices(n, (1.0 - frac, frac), self.split_seed)
            parts = {"train": keep, carve: carved}
        else:
            parts = dict(zip(SPLITS, split_indices(n, self.split, self.split_seed), strict=True))

        frames: dict[Split, pl.DataFrame] = {}
        for name in SPLITS:
            if name in parts:
                frames[name] = _take(data.train, parts[name])
                self.row_index[name], self.origin[name] = parts[name], "train"
            else:
                frames[name] = given[name]
                self.row_index[name], self.origin[name] = np.arange(given[name].height), name
            if frames[name].height == 0:
                raise ValueError(
                    f"{self.source}: the {name} split is empty (split={list(self.split)})"
                )
        return frames

    def _load(self) -> SourceData:
        """The source's frames (the seam a subclass that reads its own way overrides)."""
        return load_source(self.source, **self.source_kwargs)

    def _prepare(self) -> None:
        if self._fitted is not None:
            return
        data = self._load()
        roles = self._roles(data)
        frames = self._split(data)
        self._fitted = fit_features(
            frames["train"],
            labels=roles.labels,
            categorical=roles.categorical,
            numeric=roles.numeric,
            user_column=roles.user_column,
            **self._fit_kwargs,  # type: ignore[arg-type]
        )
        self._tensors = {
            name: encode(frame, self._fitted, origin=f"{name} split of {self.source}")
            for name, frame in frames.items()
        }
        for name in ("val", "test"):
            warn_unseen_categories(
                frames[name],
                self._tensors[name],
                self._fitted.spec,
                origin=f"{name} split of {self.source}",
                train_dtypes=frames["train"].schema,
            )
        for name in SPLITS:
            warn_one_class_labels(
                self._tensors[name], self._fitted.spec, origin=f"{name} split of {self.source}"
            )

    def setup(self, stage: str | None = None) -> None:
        """Load, split, fit and encode (once; later calls are no-ops)."""
        self._prepare()

    # ------------------------------------------------------------------ accessors
    @property
    def fitted(self) -> FittedFeatures:
        """Spec plus vocabularies (prepares the data on first access)."""
        self._prepare()
        assert self._fitted is not None
        return self._fitted

    @property
    def spec(self) -> FeatureSpec:
        """The feature spec fitted on train (prepares the data on first access)."""
        return self.fitted.spec

    def files(self) -> dict[str, list[str]]:
        """The files read, by the frame they filled (``rows``, ``val``, ``test``); {} if generated."""
        self._prepare()
        return dict(self._source_files)

    def split_how(self) -> str:
        """One sentence on how the splits were made (where the rows came from, fractions, seed)."""
        self._prepare()
        return describe_split(
            head=self._source_head,
            given=self._given,
            fractions=self.split,
            split_seed=self.split_seed,
            unused=self._unused,
        )

    def split_summary(self) -> dict[str, Any]:
        """What the run trains on: ``how`` it split, ``rows`` per split, the ``files`` read,
        and per task and split the ``positive_rate`` (binary) or ``label_mean`` (regression).

        Example:
            >>> dm = RecDataModule(source="synthetic_ctr", source_kwargs={"n": 1000, "n_users": 50,
            ...     "n_items": 40, "tasks": ["click"]})
            >>> summary = dm.split_summary()
            >>> summary["rows"], summary["how"]
            ({'train': 800, 'val': 100, 'test': 100}, 'synthetic_ctr: 1,000 generated rows (seed 0) split 80/10/10 at random (split_seed 0)')
        """
        summary: dict[str, Any] = {
            "how": self.split_how(),
            "rows": {s: len(self.tensors(s)) for s in SPLITS},
            "files": self.files(),
        }
        labels = {s: self.tensors(s).labels_BT for s in SPLITS}
        tasks = {t.name: t.kind for t in self.spec.tasks}
        return summary | label_rates(labels, tasks)

    def tensors(self, split: Split) -> TabularTensors:
        """Encoded tensors of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._prepare()
        return self._tensors[split]

    # ---------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> TensorBatchLoader:
        trainer = getattr(self, "trainer", None)
        # Under DDP each rank takes an equal, disjoint shard of every epoch's permutation.
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return TensorBatchLoader(
            tensors=self.tensors("train"),
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=self.drop_last,
            num_shards=world,
            shard_index=rank,
        )

    def _eval_loader(self, split: Split) -> TensorBatchLoader:
        # Evaluation is not sharded: every rank sees every row, so metrics are exact.
        return TensorBatchLoader(
            tensors=self.tensors(split), batch_size=self.eval_batch_size, shuffle=False
        )

    def val_dataloader(self) -> TensorBatchLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> TensorBatchLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> TensorBatchLoader:
        return self._eval_loader("test")
