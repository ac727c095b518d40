"""Warnings for data that trains but likely not as meant, shared by the in-memory and streaming paths.

A split whose categorical column holds no id known from train, or a binary label
of one class, is not an error (a run may mean it), but a user should hear of it:
:func:`warn_unseen_categories` and :func:`warn_one_class_labels` say so once per
split, naming the columns and tasks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from mtl.data.spec import FeatureSpec
    from mtl.data.tabular import TabularTensors

__all__ = [
    "DataWarning",
    "UnseenCategoriesWarning",
    "one_class_label_message",
    "warn_one_class_labels",
    "warn_unseen_categories",
]


class DataWarning(UserWarning):
    """Data that trains, but likely not as meant (a label of one class, a row-id feature).

    Example:
        >>> issubclass(DataWarning, UserWarning)
        True
    """


class UnseenCategoriesWarning(UserWarning):
    """A split whose categorical column holds no id known from the train split.

    Issued by :func:`warn_unseen_categories`; ``warnings.simplefilter("error",
    UnseenCategoriesWarning)`` makes it stop a run.

    Example:
        >>> import warnings
        >>> import torch
        >>> from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec
        >>> from mtl.data.tabular import TabularTensors
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)], numeric=[],
        ...                    tasks=[TaskSpec("click", "binary")])
        >>> val = TabularTensors(cat_BF=torch.zeros(2, 1, dtype=torch.long),  # all ids unknown
        ...                      num_BF=torch.zeros(2, 0), labels_BT=torch.zeros(2, 1))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_unseen_categories(pl.DataFrame({"item": ["x", "y"]}), val, spec, origin="val")
        ['item']
        >>> [w.category.__name__ for w in caught]
        ['UnseenCategoriesWarning']
    """


def warn_unseen_categories(
    frame: pl.DataFrame,
    tensors: TabularTensors,
    spec: FeatureSpec,
    *,
    origin: str,
    train_dtypes: Mapping[str, pl.DataType] | None = None,
) -> list[str]:
    """Warn once, naming the columns, when a split's categorical column has no id known from train.

    Every such id is encoded as the OOV index 0, so the feature carries nothing in
    that split; a split of ids disjoint from train (e.g. new ids in a later period,
    or ids written differently) is almost always a data problem, but not an error.
    Where such a column's dtype differs from train's, the message names both dtypes:
    the ids are then most likely written differently (``"12.5"`` against ``12.50``).

    Args:
        frame: the raw split.
        tensors: its encoding.
        spec: the fitted spec (categorical column order of ``tensors.cat_BF``).
        origin: split name for the message.
        train_dtypes: the train split's dtype per column, or None.

    Returns:
        The names of the columns warned about.
    """
    if not spec.categorical or len(tensors) == 0:
        return []
    known_F = (tensors.cat_BF != 0).any(dim=0)
    null_counts = frame.select(pl.col(f.name).null_count() for f in spec.categorical).row(0)
    columns = [
        f.name
        for f, known, nulls in zip(spec.categorical, known_F.tolist(), null_counts, strict=True)
        if not known and nulls < frame.height
    ]
    if columns:
        train_dtypes = train_dtypes or {}
        differ = [
            f"{c!r} is {frame.schema[c]} here but {train_dtypes[c]} in train"
            for c in columns
            if c in train_dtypes and train_dtypes[c] != frame.schema[c]
        ]
        why = (
            f"; the dtypes differ ({', '.join(differ)}): write the ids the same way in both files"
            if differ
            else ""
        )
        warnings.warn(
            f"{origin}: 100% of the ids in categorical column(s) {columns} are unseen in the train "
            f"split (or rarer than min_count), so they all map to the unknown index 0{why}",
            UnseenCategoriesWarning,
            stacklevel=2,
        )
    return columns


def warn_one_class_labels(tensors: TabularTensors, spec: FeatureSpec, *, origin: str) -> list[str]:
    """Warn, naming the tasks, when a split's binary label is all 0 or all 1.

    The task's AUC on that split is undefined (it needs both classes), and in the
    train split the model has nothing to tell apart.

    Args:
        tensors: the encoded split.
        spec: its spec (task order of ``tensors.labels_BT``).
        origin: split name for the message.

    Returns:
        The names of the tasks warned about.

    Example:
        >>> import torch
        >>> from mtl.data.spec import FeatureSpec, TaskSpec
        >>> from mtl.data.tabular import TabularTensors
        >>> spec = FeatureSpec(categorical=[], numeric=[], tasks=[TaskSpec("click", "binary")])
        >>> t = TabularTensors(cat_BF=torch.zeros(3, 0, dtype=torch.long),
        ...                    num_BF=torch.zeros(3, 0), labels_BT=torch.zeros(3, 1))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_one_class_labels(t, spec, origin="train split")
        ['click']
        >>> print(caught[0].message)
        train split: binary task 'click' has no positive labels (all 3 are 0), so its AUC is undefined
    """
    if len(tensors) == 0:
        return []
    positives_T = tensors.labels_BT.sum(dim=0).tolist()
    n = len(tensors)
    warned = []
    for task, positives in zip(spec.tasks, positives_T, strict=True):
        message = one_class_label_message(task.name, positives, n, origin=origin)
        if task.kind != "binary" or message is None:
            continue
        warnings.warn(message, DataWarning, stacklevel=2)
        warned.append(task.name)
    return warned


def one_class_label_message(task: str, positives: float, n: int, *, origin: str) -> str | None:
    """The :func:`warn_one_class_labels` text for binary task ``task`` with ``positives``
    of ``n`` labels 1, or None when both classes are present (or ``n`` is 0).

    Example:
        >>> one_class_label_message("click", 5, 5, origin="val split")
        "val split: binary task 'click' has no negative labels (all 5 are 1), so its AUC is undefined"
        >>> one_class_label_message("click", 2, 5, origin="val split") is None
        True
    """
    if n == 0 or 0 < positives < n:
        return None
    which, value = ("positive", 0) if positives == 0 else ("negative", 1)
    return (
        f"{origin}: binary task {task!r} has no {which} labels (all {n:,} are {value}), "
        "so its AUC is undefined"
    )
