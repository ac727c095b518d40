"""A ranker: the feature embedding followed by a multi-task model."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.output import MultiTaskOutput


@runtime_checkable
class ProjectsInput(Protocol):
    """A model whose first operation on its input is one linear map, exposed as a seam.

    ``model(x) == model.forward_projected(x @ model.input_weight())`` for every
    ``(B, D_in)`` input ``x`` (values and gradients), whenever
    :meth:`supports_projection` holds.
    """

    def supports_projection(self) -> bool:
        """Whether the seam applies to this instance (MMoE's is linear only with dense gates)."""
        ...

    def input_weight(self) -> Tensor:
        """``(D_in, X)``: every column the model's first layer takes from ``x``."""
        ...

    def forward_projected(self, z_BX: Tensor) -> MultiTaskOutput:
        """The model's output given ``z_BX = x @ input_weight()`` (float32)."""
        ...


class Ranker(nn.Module):
    """Embed a batch of raw features and run a multi-task model on it.

    The model sees a plain ``(B, D_in)`` tensor; it knows nothing of the
    embedding. When the model exposes its first linear map (:class:`ProjectsInput`:
    MMoE, OMoE, PLE) and some embedding table is small enough to fold at this
    batch size (:meth:`FeatureEmbedding.folds`), the ranker computes that
    product with :meth:`FeatureEmbedding.project` instead and continues the
    model from it: the same result, without the ``(B, D_in) @ (D_in, X)`` GEMM.
    A model whose first map is not linear in ``x`` (sparse or jittered gates:
    ``supports_projection()`` is false) takes the plain path.

    Args:
        embedding: the :class:`~mtl.models.rec.embedding.FeatureEmbedding` of the data's spec.
        model: any multi-task model mapping ``(B, embedding.output_dim)`` to a
            :class:`~mtl.models.rec.output.MultiTaskOutput` (MMoE, PLE, HoME, ...).

    Shapes:
        ``cat_BF (B, F_c)`` int64, ``num_BF (B, F_n)`` float -> logits ``{task: (B,)}``.

    Example:
        >>> import torch
        >>> from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec
        >>> from mtl.models.rec.mmoe import MMoE
        >>> spec = FeatureSpec(categorical=[CategoricalFeature("item", 10, 4)], numeric=[],
        ...     tasks=[TaskSpec("click", "binary")])
        >>> emb = FeatureEmbedding(spec=spec)
        >>> ranker = Ranker(embedding=emb, model=MMoE(d_in=4, tasks=["click"], expert_hidden=[8]))
        >>> ranker(torch.tensor([[3], [0]]), torch.zeros(2, 0)).logits["click"].shape
        torch.Size([2])
    """

    def __init__(self, *, embedding: FeatureEmbedding, model: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.model = model

    def folds(self, batch_size: int) -> bool:
        """Whether :meth:`forward` folds embedding tables into the model's first layer."""
        return (
            isinstance(self.model, ProjectsInput)
            and self.model.supports_projection()
            and any(self.embedding.folds(batch_size))
        )

    def forward(self, cat_BF: Tensor, num_BF: Tensor) -> MultiTaskOutput:
        if self.folds(cat_BF.shape[0]):
            w_DX = self.model.input_weight()  # type: ignore[operator]
            z_BX = self.embedding.project(cat_BF, num_BF, w_DX)
            return self.model.forward_projected(z_BX)  # type: ignore[operator]
        return self.model(self.embedding(cat_BF, num_BF))
