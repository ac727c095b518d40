"""Entire space multi-task model (Ma et al., SIGIR 2018): CTCVR = CTR x CVR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.models.rec.common import as_widths, check_dim, check_name, check_tasks
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.towers import Tower, make_mlp


class ESMM(nn.Module):
    """ESMM: a CTR tower and a CVR tower over shared embeddings; ``pCTCVR = pCTR * pCVR``.

    Both towers read the same embedded input (the embedding table is the part
    the two tasks share), optionally through a shared bottom MLP. The model is
    trained on the entire impression space with two losses, on ``ctr`` (click
    label) and ``ctcvr`` (click-and-convert label); CVR, ``P(convert | click)``,
    is never supervised directly, which avoids sample-selection bias and lets
    the sparse conversion task borrow from the dense click task.

    Outputs: the CTR logit in ``logits[ctr_task]``, ``pCTCVR`` in
    ``probs[ctcvr_task]`` and, when ``cvr_task`` is set, ``pCVR`` in
    ``probs[cvr_task]``. ``cvr_task`` need not be one of ``tasks``: then it is an
    extra, unsupervised output for inspection, and training loops should
    compute losses for ``tasks`` only. ``tasks`` must contain ``ctr_task`` and
    ``ctcvr_task`` and nothing else but ``cvr_task``.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in order.
        ctr_task: name of the click task.
        ctcvr_task: name of the click-and-conversion task.
        cvr_task: name under which ``pCVR`` is exposed (None: not exposed).
        bottom_hidden: widths of an optional shared MLP below the towers (empty:
            towers read the embeddings, as in the paper).
        tower_hidden: hidden widths of the CTR and CVR towers.
        dropout: dropout in the bottom and the towers.

    Shapes:
        ``x (B, d_in) ->`` ``logits[ctr] (B,)``, ``probs[ctcvr] (B,)``.

    Example:
        >>> model = ESMM(d_in=16, tasks=["ctr", "ctcvr"], cvr_task="cvr", tower_hidden=[8])
        >>> out = model(torch.randn(4, 16))
        >>> sorted(out.logits), sorted(out.probs)
        (['ctr'], ['ctcvr', 'cvr'])
    """

    def __init__(
        self,
        *,
        d_in: int,
        tasks: Sequence[str],
        ctr_task: str = "ctr",
        ctcvr_task: str = "ctcvr",
        cvr_task: str | None = None,
        bottom_hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (200, 80),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        self.ctr_task = check_name("task", ctr_task)
        self.ctcvr_task = check_name("task", ctcvr_task)
        self.cvr_task = None if cvr_task is None else check_name("task", cvr_task)
        names = [self.ctr_task, self.ctcvr_task] + ([self.cvr_task] if self.cvr_task else [])
        if len(set(names)) != len(names):
            raise ValueError(f"ctr_task, ctcvr_task and cvr_task must differ, got {names}")
        missing = [t for t in (self.ctr_task, self.ctcvr_task) if t not in self.tasks]
        extra = [t for t in self.tasks if t not in names]
        if missing or extra:
            raise ValueError(
                f"ESMM predicts ctr_task={self.ctr_task!r}, ctcvr_task={self.ctcvr_task!r} "
                f"(and optionally cvr_task={self.cvr_task!r}); tasks {self.tasks} "
                f"lack {missing} and have unknown {extra}"
            )
        widths = as_widths("bottom_hidden", bottom_hidden)
        self.bottom = make_mlp(d_in, widths, dropout)
        d_tower = widths[-1] if widths else d_in
        self.ctr_tower = Tower(d_in=d_tower, hidden=tower_hidden, dropout=dropout)
        self.cvr_tower = Tower(d_in=d_tower, hidden=tower_hidden, dropout=dropout)

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        h_BH = self.bottom(x_BD)
        ctr_logit_B = self.ctr_tower(h_BH)
        p_cvr_B = torch.sigmoid(self.cvr_tower(h_BH))
        probs = {self.ctcvr_task: torch.sigmoid(ctr_logit_B) * p_cvr_B}
        if self.cvr_task is not None:
            probs[self.cvr_task] = p_cvr_B
        return MultiTaskOutput(
            logits={self.ctr_task: ctr_logit_B},
            probs=probs,
            aux_loss=torch.zeros((), dtype=torch.float32, device=x_BD.device),
        )
