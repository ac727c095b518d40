"""Feature specification for tabular multi-task ranking data, and fitting it on a train split.

A :class:`FeatureSpec` is the contract between the data layer and the models: it
lists the categorical features (with vocabulary size and embedding width), the
numeric features (with the train mean/std used to standardise them), the tasks and
the optional user column. :func:`fit_features` learns a spec plus the categorical
vocabularies from the TRAIN split only, so that validation/test never leak into
the encoding; unseen categories are then mapped to index 0 (OOV).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from mtl.data.numeric_range import check_in_range
from mtl.data.spec import (
    TASK_KINDS,
    CategoricalFeature,
    FeatureSpec,
    NumericFeature,
    TaskKind,
    TaskSpec,
)
from mtl.data.validation import check_embed_dim
from mtl.data.vocabulary import (
    category_counts,
    check_vocab_options,
    vocabulary_from_counts,
    warn_id_like_columns,
)

__all__ = [
    "DEFAULT_MAX_INT_CATEGORIES",
    "TASK_KINDS",
    "CategoricalFeature",
    "ColumnRoles",
    "FeatureSpec",
    "FittedFeatures",
    "NumericFeature",
    "TaskKind",
    "TaskSpec",
    "assemble_fitted",
    "check_roles_disjoint",
    "default_embed_dim",
    "fit_features",
    "infer_roles",
    "names_list",
    "numeric_feature",
]

# Integer columns with at most this many distinct train values are treated as
# categorical when roles are inferred (codes such as "industry recode 0..51").
DEFAULT_MAX_INT_CATEGORIES = 1000


def names_list(value: object, *, key: str) -> list[str]:
    """A config value that lists column names, as a list: one name alone is a list of one.

    ``data.labels=click`` reaches the code as the text ``"click"``, which ``list()``
    would split into characters; a name alone means that one column.

    Args:
        value: None or ``""`` (no names), a name, or a list of names (text or integers).
        key: the config key, for the message.

    Raises:
        ValueError: ``value`` is neither, naming ``key``.

    Example:
        >>> names_list("click", key="data.labels"), names_list(["a", 1], key="data.numeric")
        (['click'], ['a', '1'])
    """

    def is_name(v: object) -> bool:  # a header "2024" arrives from Hydra as an int
        return isinstance(v, (str, int)) and not isinstance(v, bool)

    if value is None or value == "":
        return []
    if is_name(value):
        return [str(value)]
    if isinstance(value, Sequence) and all(is_name(v) for v in value):
        return [str(v) for v in value]
    raise ValueError(
        f"{key} must be a column name or a list of column names (e.g. {key}=[a,b]), "
        f"got {type(value).__name__} {value!r}"
    )


@dataclass
class ColumnRoles:
    """Which raw column plays which part; what a source hands to the data module.

    Example:
        >>> ColumnRoles(categorical=["item"], numeric=["price"], labels={"click": "binary"}).label_names
        ['click']
    """

    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    labels: dict[str, TaskKind] = field(default_factory=dict)
    user_column: str | None = None

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    def columns(self) -> list[str]:
        """All columns needed to encode a frame, without duplicates, in a stable order."""
        cols = [*self.categorical, *self.numeric, *self.labels]
        if self.user_column is not None:
            cols.append(self.user_column)
        return list(dict.fromkeys(cols))


@dataclass
class FittedFeatures:
    """A :class:`FeatureSpec` plus the train vocabularies needed to encode any split.

    Args:
        spec: the fitted spec.
        vocabularies: per categorical feature, the known category strings; the
            category at position ``i`` is encoded as ``i + 1`` (0 is OOV).

    Example:
        >>> train = pl.DataFrame({"c": ["a", "b", "a"], "y": [0, 1, 1]})
        >>> fitted = fit_features(train, categorical=["c"], numeric=[], labels={"y": "binary"})
        >>> fitted.vocabularies["c"].to_list()
        ['a', 'b']
    """

    spec: FeatureSpec
    vocabularies: dict[str, pl.Series]


def default_embed_dim(vocab_size: int, *, max_dim: int = 16) -> int:
    """The usual ``6 * vocab**0.25`` rule of thumb, capped at ``max_dim`` and at least 1.

    Example:
        >>> default_embed_dim(2), default_embed_dim(10), default_embed_dim(100_000)
        (7, 11, 16)
    """
    return max(1, min(max_dim, round(6 * max(vocab_size, 1) ** 0.25)))


def infer_roles(
    df: pl.DataFrame,
    *,
    labels: Mapping[str, TaskKind],
    user_column: str | None = None,
    exclude: Sequence[str] = (),
    max_int_categories: int = DEFAULT_MAX_INT_CATEGORIES,
) -> ColumnRoles:
    """Guess feature roles from the polars schema.

    String / categorical / enum / boolean columns are categorical; integer columns
    with at most ``max_int_categories`` distinct values are categorical, other
    integers and all floats numeric. The user column, being an id, is categorical.
    Label columns and ``exclude`` are skipped.

    Example:
        >>> df = pl.DataFrame({"c": ["a", "b"], "n": [0.5, 1.5], "y": [0, 1]})
        >>> infer_roles(df, labels={"y": "binary"}).categorical
        ['c']
    """
    skip = set(labels) | set(exclude)
    categorical: list[str] = []
    numeric: list[str] = []
    for name, dtype in df.schema.items():
        if name in skip:
            continue
        if (
            name == user_column
            or dtype in (pl.String, pl.Categorical, pl.Boolean)
            or isinstance(dtype, pl.Enum)
        ):
            categorical.append(name)
        elif dtype.is_integer():
            is_code = df[name].n_unique() <= max_int_categories
            (categorical if is_code else numeric).append(name)
        elif dtype.is_float():
            numeric.append(name)
        else:
            raise ValueError(
                f"column {name!r} has dtype {dtype}, which has no feature role; list it in exclude"
            )
    return ColumnRoles(
        categorical=categorical, numeric=numeric, labels=dict(labels), user_column=user_column
    )


def check_roles_disjoint(
    categorical: Sequence[str], numeric: Sequence[str], labels: Iterable[str]
) -> None:
    """Each column has one role: categorical, numeric or label; else ValueError naming them."""
    features = set(categorical) | set(numeric)
    overlap = (set(categorical) & set(numeric)) | (features & set(labels))
    if overlap:
        raise ValueError(
            f"columns {sorted(overlap)} are given more than one role (feature and label, or "
            "both feature kinds); give each one role"
        )


def numeric_feature(name: str, mean: float, std: float) -> NumericFeature:
    """The standardisation of one numeric column from its train mean and std (ddof 0).

    A constant column (std 0, or not finite) is left unscaled: it maps to 0 everywhere.

    Example:
        >>> numeric_feature("x", 3.0, 0.0)
        NumericFeature(name='x', mean=3.0, std=1.0)
    """
    if not math.isfinite(std) or std < 1e-12:
        std = 1.0
    return NumericFeature(name=name, mean=float(mean), std=float(std))


def _fit_numeric(col: pl.Series) -> NumericFeature:
    bad = col.is_null().sum() + (col.is_nan().sum() if col.dtype.is_float() else 0)
    if bad:
        raise ValueError(
            f"numeric feature {col.name!r} has {bad} null/NaN values in the train split; "
            "fill them in the source (e.g. fill_numeric_nulls=0.0) or declare the column categorical"
        )
    check_in_range(col, "train split")  # an inf would make the mean or std inf
    values = col.cast(pl.Float64)
    mean = float(values.mean())  # type: ignore[arg-type]
    std = float(values.std(ddof=0))  # type: ignore[arg-type]
    return numeric_feature(col.name, mean, std)


def fit_features(
    train: pl.DataFrame,
    *,
    labels: Mapping[str, TaskKind],
    categorical: Sequence[str] | None = None,
    numeric: Sequence[str] | None = None,
    user_column: str | None = None,
    embed_dim: int | Mapping[str, int] | None = None,
    max_embed_dim: int = 16,
    min_count: int = 1,
    task_weights: Mapping[str, float] | None = None,
    max_int_categories: int = DEFAULT_MAX_INT_CATEGORIES,
    max_vocab: int | None = None,
) -> FittedFeatures:
    """Fit vocabularies, numeric statistics and embedding widths on the TRAIN split.

    Args:
        train: the train split (never fit on validation or test).
        labels: label column -> ``"binary"`` | ``"regression"``, in task order.
        categorical: categorical columns; with ``numeric`` also None, roles of all
            non-label columns are inferred with :func:`infer_roles`.
        numeric: numeric columns (see ``categorical``).
        user_column: column holding the user id (for per-user metrics), or None.
        embed_dim: a fixed width for every categorical feature, a per-feature
            mapping (missing names use the rule), or None for
            :func:`default_embed_dim` with ``max_embed_dim``.
        max_embed_dim: cap of the default rule.
        min_count: categories seen fewer times in train are mapped to OOV (0).
        task_weights: optional loss weight per task (default 1.0).
        max_int_categories: see :func:`infer_roles`.
        max_vocab: keep at most this many categories per column, the most frequent
            (see :func:`~mtl.data.vocabulary.vocabulary_from_counts`); None keeps all.

    Returns:
        A :class:`FittedFeatures` holding the :class:`FeatureSpec` and the vocabularies.

    Example:
        >>> train = pl.DataFrame({"c": ["x", "y", "y"], "n": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
        >>> f = fit_features(train, labels={"y": "binary"}, embed_dim=4)
        >>> [c.vocab_size for c in f.spec.categorical], round(f.spec.numeric[0].mean, 2)
        ([2], 2.0)
    """
    if not labels:
        raise ValueError("fit_features needs at least one label column")
    check_vocab_options(min_count, max_vocab)
    check_embed_dim(embed_dim)
    check_embed_dim(max_embed_dim, key="max_embed_dim", allow_none=False)
    if categorical is None and numeric is None:
        roles = infer_roles(
            train, labels=labels, user_column=user_column, max_int_categories=max_int_categories
        )
        categorical, numeric = roles.categorical, roles.numeric
    categorical, numeric = list(categorical or []), list(numeric or [])
    needed = [*categorical, *numeric, *labels] + ([user_column] if user_column else [])
    missing = [c for c in needed if c not in train.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the train frame (columns: {train.columns})")
    check_roles_disjoint(categorical, numeric, labels)

    vocabularies = {
        name: vocabulary_from_counts(
            category_counts(train, name), name, min_count=min_count, max_vocab=max_vocab
        )
        for name in categorical
    }
    warn_id_like_columns(
        {name: len(vocab) for name, vocab in vocabularies.items()},
        train.height,
        min_count=min_count,
        max_vocab=max_vocab,
    )
    return assemble_fitted(
        vocabularies=vocabularies,
        numeric=[_fit_numeric(train[name]) for name in numeric],
        labels=labels,
        user_column=user_column,
        embed_dim=embed_dim,
        max_embed_dim=max_embed_dim,
        task_weights=task_weights,
    )


def assemble_fitted(
    *,
    vocabularies: Mapping[str, pl.Series],
    numeric: Sequence[NumericFeature],
    labels: Mapping[str, TaskKind],
    user_column: str | None = None,
    embed_dim: int | Mapping[str, int] | None = None,
    max_embed_dim: int = 16,
    task_weights: Mapping[str, float] | None = None,
) -> FittedFeatures:
    """The :class:`FittedFeatures` of fitted vocabularies and numeric statistics: embedding
    widths and tasks by the rules of :func:`fit_features` (which fits in memory; a
    streaming fit over files hands its parts here too).

    Example:
        >>> f = assemble_fitted(vocabularies={"c": pl.Series("c", ["a", "b"])},
        ...     numeric=[NumericFeature("x", 0.0, 1.0)], labels={"y": "binary"}, embed_dim=4)
        >>> f.spec.categorical[0], f.spec.task_names
        (CategoricalFeature(name='c', vocab_size=2, embed_dim=4), ['y'])
    """
    cat_features: list[CategoricalFeature] = []
    for name, vocab in vocabularies.items():
        if isinstance(embed_dim, int):
            dim = embed_dim
        elif isinstance(embed_dim, Mapping) and name in embed_dim:
            dim = int(embed_dim[name])
        else:
            dim = default_embed_dim(len(vocab), max_dim=max_embed_dim)
        cat_features.append(CategoricalFeature(name=name, vocab_size=len(vocab), embed_dim=dim))

    weights = dict(task_weights or {})
    unknown = set(weights) - set(labels)
    if unknown:
        raise ValueError(f"task_weights names {sorted(unknown)} are not labels ({list(labels)})")
    spec = FeatureSpec(
        categorical=cat_features,
        numeric=list(numeric),
        tasks=[
            TaskSpec(name=n, kind=k, weight=float(weights.get(n, 1.0))) for n, k in labels.items()
        ],
        user_column=user_column,
    )
    return FittedFeatures(spec=spec, vocabularies=dict(vocabularies))
