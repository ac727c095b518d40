"""The feature specification: what a model needs to know about the encoded inputs and the tasks.

Plain dataclasses with no dependency beyond the standard library, so that the
models (:mod:`mtl.models.rec`) import without the data layer's polars;
:mod:`mtl.data.features` fits them on a train split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

TaskKind = Literal["binary", "regression"]
TASK_KINDS: tuple[str, ...] = ("binary", "regression")


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical input column.

    Args:
        name: column name in the source frame.
        vocab_size: number of categories known from the train split, EXCLUDING the
            OOV slot; the embedding table therefore has ``vocab_size + 1`` rows and
            index 0 means unseen / null / too rare.
        embed_dim: width of this feature's embedding.

    Example:
        >>> CategoricalFeature(name="device", vocab_size=4, embed_dim=8).vocab_size
        4
    """

    name: str
    vocab_size: int
    embed_dim: int


@dataclass(frozen=True)
class NumericFeature:
    """A numeric input column, standardised as ``(x - mean) / std`` with train statistics.

    Args:
        name: raw column name.
        mean: mean of the column over the train split.
        std: its standard deviation over the train split (ddof 0); 1.0 for a
            constant column, which then maps to 0.

    Example:
        >>> NumericFeature(name="age", mean=34.5, std=22.3).name
        'age'
    """

    name: str
    mean: float
    std: float


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target.

    Args:
        name: label column name.
        kind: ``"binary"`` (0/1 label, logit output) or ``"regression"``.
        weight: default loss weight of the task.

    Example:
        >>> TaskSpec(name="click", kind="binary").weight
        1.0
    """

    name: str
    kind: TaskKind
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}"
            )


@dataclass
class FeatureSpec:
    """Everything a model needs to know about the encoded inputs and the tasks.

    The column order here is the column order of ``cat_BF``, ``num_BF`` and
    ``labels_BT`` in :class:`mtl.data.tabular.TabularTensors`.

    Args:
        categorical: categorical features, in tensor column order.
        numeric: numeric features, in tensor column order.
        tasks: tasks, in label column order.
        user_column: raw column giving the user id used for per-user metrics, or None.

    Example:
        >>> spec = FeatureSpec(
        ...     categorical=[CategoricalFeature("item", 100, 8)],
        ...     numeric=[NumericFeature("price", 3.0, 1.5)],
        ...     tasks=[TaskSpec("click", "binary")],
        ... )
        >>> spec.n_categorical, spec.n_numeric, spec.task_names
        (1, 1, ['click'])
    """

    categorical: list[CategoricalFeature]
    numeric: list[NumericFeature]
    tasks: list[TaskSpec]
    user_column: str | None = None

    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints / hyper-parameter logging)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            categorical=[CategoricalFeature(**c) for c in data["categorical"]],
            numeric=[NumericFeature(**n) for n in data["numeric"]],
            tasks=[TaskSpec(**t) for t in data["tasks"]],
            user_column=data.get("user_column"),
        )
