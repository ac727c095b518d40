"""HoME: hierarchy of multi-gate experts (Wang et al., Kuaishou, arXiv 2408.05430)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.models.rec.common import (
    SHARED_UNIT,
    as_loss_weights,
    as_widths,
    check_dim,
    check_name,
    check_tasks,
    gate_aux_loss,
    representation_bank,
)
from mtl.models.rec.output import GateLevel, MultiTaskOutput
from mtl.models.rec.towers import TaskTowers
from mtl.moe import DenseSoftmaxGate, MultiGateMixture, combine_dense
from mtl.moe.gates import SelfGate
from mtl.moe.multi_gate import GateFactory, make_gate


class FeatureGate(nn.Module):
    """HoME feature gate: ``x_e' = x_e * 2 * sigmoid(x_e B_e A_e)`` for every expert ``e``.

    ``B_e`` (``D x r``) and ``A_e`` (``r x D``) are a LoRA-style low-rank
    factorisation, so each expert's gate costs ``2 D r`` parameters instead of
    ``D^2``. The factor 2 makes the gate 1 where the logit is 0, so on average
    the input keeps its scale. All experts are computed in two batched einsums
    and the result ``(E, T, D)`` is fed to
    :meth:`~mtl.moe.expert_bank.ExpertBank.forward_all` as per-expert input.

    Initialisation: ``B`` has fan-in scale (``x B`` has about the variance of
    ``x``) and ``A`` is scaled by ``init_scale / sqrt(r)``, so the gate logits
    start with standard deviation about ``init_scale`` and the gates near 1
    (about ``1 +- init_scale / 2``): the expert first sees almost its plain
    input. Unlike LoRA's zero-initialised ``A``, both factors get gradient from
    the first step and the gate is not an exact no-op at init.

    Args:
        num_experts: ``E``.
        d_model: ``D``, width of the (per-expert) input.
        rank: ``r``, rank of the factorisation (``Y`` in shape suffixes).
        init_scale: approximate standard deviation of the initial gate logits.

    Shapes:
        ``(T, D)`` shared or ``(E, T, D)`` per-expert input -> ``(E, T, D)``.

    Example:
        >>> fg = FeatureGate(num_experts=3, d_model=16, rank=4)
        >>> fg(torch.randn(10, 16)).shape
        torch.Size([3, 10, 16])
    """

    def __init__(
        self, *, num_experts: int, d_model: int, rank: int, init_scale: float = 0.1
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not init_scale >= 0:
            raise ValueError(f"init_scale must be >= 0, got {init_scale}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.rank = rank
        self.init_scale = float(init_scale)
        # R in these two names is the rank Y; the names stay, they are state_dict keys
        self.down_EDR = nn.Parameter(torch.empty(num_experts, d_model, rank))
        self.up_ERD = nn.Parameter(torch.empty(num_experts, rank, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down_EDR, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.up_ERD, std=self.init_scale / math.sqrt(self.rank))

    def gates(self, x: Tensor) -> Tensor:
        """Gate values ``2 * sigmoid(x B_e A_e)``, ``(E, T, D)``, each in ``(0, 2)``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"feature gate input has width {x.shape[-1]}, expected {self.d_model}")
        if x.dim() == 2:
            z_ETY = torch.einsum("td,edr->etr", x, self.down_EDR)
        elif x.dim() == 3 and x.shape[0] == self.num_experts:
            z_ETY = torch.einsum("etd,edr->etr", x, self.down_EDR)
        else:
            raise ValueError(
                f"feature gate expects (T, D) or ({self.num_experts}, T, D), got {tuple(x.shape)}"
            )
        return 2.0 * torch.sigmoid(torch.einsum("etr,erd->etd", z_ETY, self.up_ERD))

    def forward(self, x: Tensor) -> Tensor:
        """Gated per-expert input ``(E, T, D)``."""
        return x * self.gates(x)  # (T, D) broadcasts against (E, T, D)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, rank={self.rank}"


class HoME(nn.Module):
    """HoME: two levels of multi-gate experts following a task hierarchy, with three fixes.

    Tasks are grouped into meta-task categories (``task_groups``; Kuaishou:
    passive watching vs interaction). Structure (``S`` global shared experts,
    ``G`` experts per category, ``K`` per task):

    * Level 1 (meta level), one :class:`~mtl.moe.ExpertBank` of ``S + G * n_groups``
      experts on the input ``x``. A shared meta gate mixes all of them into
      ``m_shared``; category ``c``'s gate mixes the global shared experts and
      ``c``'s own into ``m_c``.
    * Level 2 (task level), one bank of ``S + G * n_groups + K * n_tasks``
      experts: global shared experts read ``m_shared``; category ``c``'s experts
      and the experts of each task in ``c`` read ``m_c``. Task ``t``'s gate (input
      ``m_{c(t)}``) mixes the global shared experts, its category's and its own.
    * ``logit_t = Tower_t(h_t)``.

    The paper's three fixes, as four switches (feature and self gates are one fix):

    * ``expert_norm``: experts are ``Swish(BN(Linear(.)))`` with per-expert batch
      norm; off: ``ReLU(Linear(.))``.
    * ``hierarchy_mask``: gates see only the experts above (``expert_mask`` on
      :class:`~mtl.moe.DenseSoftmaxGate`, masked experts get weight and
      gradient exactly 0); off: every gate sees every expert of its level.
    * ``feature_gate``: each expert ``e`` reads ``v_e * 2 sigmoid(v_e B_e A_e)``
      with rank-``lora_rank`` factors (:class:`FeatureGate`),
      at both levels, computed for all experts in one batched einsum.
    * ``self_gate``: ``h_t += sum_e s_te * Meta_e(x)`` over the level-1 experts of
      ``t``'s category, ``s_t`` a softmax over them (sigmoid when there is one;
      :class:`~mtl.moe.gates.SelfGate`) computed from ``x``: a gated
      residual from the lower level to the upper one, so task gradients reach
      the meta experts directly.

    With all four off the model is a plain two-level hierarchical MMoE: ReLU
    experts, every gate over all experts, same input wiring (tested).

    Details the paper leaves open (or that we could not confirm), and our choice:

    * Which experts level 2 has: the shared meta representation ``m_shared``
      must feed something, so level 2 has global shared experts reading it and
      a task gate sees global shared + category + task experts (our reading of
      the paper's equations; secondary notes list only category + task experts
      at level 2). Level 1 has no per-task experts.
    * Gate inputs: ``x`` at level 1, the category meta representation at level 2.
    * Self-gate form and placement (paper not confirmed): as above, one per task.
    * Feature-gate initialisation: near 1 (logit std about 0.1), not exactly 1,
      so both low-rank factors train from step 1; placed on every expert's input.
    * Expert depth and width: ``expert_hidden`` (default one layer of 256, the
      public KuaiRand reproduction's width), the same at both levels.
    * Default grouping when ``task_groups`` is None: one group with all tasks.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order.
        task_groups: ``{category: [task, ...]}`` covering every task exactly once.
        num_shared_experts: ``S`` (>= 1), global shared experts per level.
        num_group_experts: ``G`` (>= 1), experts per category per level.
        num_task_experts: ``K`` (>= 0), experts per task at level 2.
        expert_hidden: widths of each expert MLP; the last is the representation width.
        lora_rank: rank of the feature gates.
        tower_hidden: hidden widths of each task tower.
        dropout: dropout in the towers.
        expert_norm: batch norm + Swish experts (else ReLU, no norm).
        hierarchy_mask: restrict gates to the hierarchy (else all experts).
        feature_gate: per-expert low-rank feature gates.
        self_gate: gated residual from the category's meta experts to each task.
        gate: builds the level-1 and task gates from ``d_model``, ``num_experts``
            (and ``expert_mask`` under ``hierarchy_mask``); default
            :class:`~mtl.moe.DenseSoftmaxGate`. Ranking gates (top-k, noisy top-k,
            top-p, sigmoid + bias) are masked through their logits; expert choice
            needs ``hierarchy_mask=False``. The self gates stay :class:`~mtl.moe.gates.SelfGate`.
        aux_loss_weights: ``{loss name: weight}`` over the level-1 and task gates.
        sparse_compute: with sparse gates, run each expert on its routed rows
            only (None: unless ``expert_norm``; False: dense, for A/B runs); see
            :class:`~mtl.moe.MultiGateMixture`. With ``self_gate`` the meta level
            stays dense: the self gates read every meta expert on every row.

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``; gate weights ``{task: (B, E)}``
        and expert outputs ``(E, B, expert_hidden[-1])`` of level 2.

    Example:
        >>> model = HoME(d_in=16, tasks=["evtr", "like", "comment"],
        ...              task_groups={"watch": ["evtr"], "inter": ["like", "comment"]},
        ...              expert_hidden=[32], lora_rank=4)
        >>> out = model(torch.randn(8, 16))
        >>> out.expert_kinds[4:]
        ['group:watch', 'group:watch', 'group:inter', 'group:inter', 'task:evtr', 'task:like', 'task:comment']
    """

    def __init__(
        self,
        *,
        d_in: int,
        tasks: Sequence[str],
        task_groups: Mapping[str, Sequence[str]] | None = None,
        num_shared_experts: int = 4,
        num_group_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (256,),
        lora_rank: int = 64,
        tower_hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        expert_norm: bool = True,
        hierarchy_mask: bool = True,
        feature_gate: bool = True,
        self_gate: bool = True,
        gate: GateFactory = DenseSoftmaxGate,
        aux_loss_weights: Mapping[str, float] | None = None,
        sparse_compute: bool | None = None,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        self.task_groups = check_task_groups(task_groups, self.tasks)
        self.groups = list(self.task_groups)
        self.group_of = {t: g for g, ts in self.task_groups.items() for t in ts}
        S = check_dim("num_shared_experts", num_shared_experts)
        G = check_dim("num_group_experts", num_group_experts)
        K = check_dim("num_task_experts", num_task_experts, minimum=0)
        widths = as_widths("expert_hidden", expert_hidden, allow_empty=False)
        H = widths[-1]
        self.aux_loss_weights = as_loss_weights(aux_loss_weights)

        kinds1 = ["shared"] * S + [f"group:{g}" for g in self.groups for _ in range(G)]
        kinds2 = kinds1 + [f"task:{t}" for t in self.tasks for _ in range(K)]
        self.meta_expert_kinds = kinds1
        self.expert_kinds = kinds2
        E1, E2 = len(kinds1), len(kinds2)
        rank = check_dim("lora_rank", lora_rank)
        activation = "swish" if expert_norm else "relu"
        self.expert_activation = activation

        def allowed(kinds: list[str], keep: set[str]) -> list[int] | None:
            return [e for e, k in enumerate(kinds) if k in keep] if hierarchy_mask else None

        # Level 1 (meta): feature gates on x, the meta experts, one gate per category + a shared one.
        self.meta_feature_gate = (
            FeatureGate(num_experts=E1, d_model=d_in, rank=rank) if feature_gate else None
        )
        gates1: dict[str, nn.Module] = {
            SHARED_UNIT: make_gate(gate, d_model=d_in, num_experts=E1, name="meta shared gate")
        }
        for g in self.groups:
            mask = allowed(kinds1, {"shared", f"group:{g}"})
            gates1[g] = make_gate(
                gate, d_model=d_in, num_experts=E1, expert_mask=mask, name=f"meta gate {g!r}"
            )
        self.meta = MultiGateMixture(
            experts=representation_bank(
                num_experts=E1, dims=[d_in, *widths], activation=activation, expert_norm=expert_norm
            ),
            gates=gates1,
            sparse_compute=False if self_gate else sparse_compute,
        )
        # Level 2 (tasks): experts read unit 0 (m_shared) or unit 1 + i (category i's m_c).
        unit = {g: i + 1 for i, g in enumerate(self.groups)}
        owner = [0] * S + [unit[g] for g in self.groups for _ in range(G)]
        owner += [unit[self.group_of[t]] for t in self.tasks for _ in range(K)]
        self.register_buffer("owner_E", torch.tensor(owner, dtype=torch.long), persistent=False)
        self.task_feature_gate = (
            FeatureGate(num_experts=E2, d_model=H, rank=rank) if feature_gate else None
        )
        gates2: dict[str, nn.Module] = {}
        for t in self.tasks:
            mask = allowed(kinds2, {"shared", f"group:{self.group_of[t]}", f"task:{t}"})
            gates2[t] = make_gate(
                gate, d_model=H, num_experts=E2, expert_mask=mask, name=f"task gate {t!r}"
            )
        self.task_level = MultiGateMixture(
            experts=representation_bank(
                num_experts=E2, dims=[H, *widths], activation=activation, expert_norm=expert_norm
            ),
            gates=gates2,
            sparse_compute=sparse_compute,
        )
        # Self gates: each task's gated residual from its category's meta experts.
        self.self_gates = (
            nn.ModuleDict(
                {
                    t: SelfGate(
                        d_model=d_in,
                        num_experts=E1,
                        expert_mask=[e for e, k in enumerate(kinds1) if k == f"group:{g}"],
                    )
                    for t, g in self.group_of.items()
                }
            )
            if self_gate
            else None
        )
        self.towers = TaskTowers(tasks=self.tasks, d_in=H, hidden=tower_hidden, dropout=dropout)

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        x1 = x_BD if self.meta_feature_gate is None else self.meta_feature_gate(x_BD)
        meta = self.meta(x1, gate_inputs=x_BD)
        m = meta.outputs
        reps_GBH = torch.stack([m[SHARED_UNIT], *(m[g] for g in self.groups)])
        x2_EBH = reps_GBH.index_select(0, self.owner_E)  # each expert reads its owner's rep
        if self.task_feature_gate is not None:
            x2_EBH = self.task_feature_gate(x2_EBH)
        top = self.task_level(x2_EBH, gate_inputs={t: m[self.group_of[t]] for t in self.tasks})
        reps = dict(top.outputs)
        if self.self_gates is not None:
            for t in self.tasks:
                s_BE = self.self_gates[t](x_BD).dense_weights()
                reps[t] = reps[t] + combine_dense(meta.expert_outputs_ETD, s_BE)
        routings = [*meta.routing.values(), *top.routing.values()]
        return MultiTaskOutput(
            logits=self.towers(reps),
            aux_loss=gate_aux_loss(routings, self.aux_loss_weights, x_BD.device),
            gate_weights={t: top.routing[t].dense_weights() for t in self.tasks},
            expert_outputs=top.expert_outputs,
            expert_kinds=list(self.expert_kinds),
            expert_load={0: meta.expert_load(), 1: top.expert_load()},
            expert_activation=self.expert_activation,
            lower_levels=[
                GateLevel(
                    name="level 1 of 2 (meta)",
                    gate_weights={g: r.dense_weights() for g, r in meta.routing.items()},
                    expert_outputs=meta.expert_outputs,
                    expert_kinds=list(self.meta_expert_kinds),
                    activation=self.expert_activation,
                )
            ],
        )


def check_task_groups(
    task_groups: Mapping[str, Sequence[str]] | None, tasks: Sequence[str]
) -> dict[str, list[str]]:
    """Validated ``{category: [task, ...]}``: every task in exactly one category.

    None means one category, ``"all"``, holding every task.

    Example:
        >>> check_task_groups({"watch": ["evtr"], "inter": ["like"]}, ["like", "evtr"])
        {'watch': ['evtr'], 'inter': ['like']}
    """
    if task_groups is None:
        return {"all": list(tasks)}
    if not isinstance(task_groups, Mapping) or not task_groups:
        raise ValueError(f"task_groups must map category names to task lists, got {task_groups!r}")
    out: dict[str, list[str]] = {}
    for g, members in task_groups.items():
        check_name("task group", g)
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ValueError(f"task group {g!r} must list at least one task, got {members!r}")
        out[g] = [str(t) for t in members]
    listed = [t for ts in out.values() for t in ts]
    unknown = sorted({t for t in listed if t not in tasks})
    if unknown:
        raise ValueError(f"task_groups name unknown tasks {unknown}; tasks are {list(tasks)}")
    repeated = sorted({t for t in listed if listed.count(t) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} appear in more than one task group")
    missing = [t for t in tasks if t not in listed]
    if missing:
        raise ValueError(f"tasks {missing} are in no task group; groups: {sorted(out)}")
    return out
