"""The expert/gate abstraction shared by every model in mtl.

Parts:
    experts  -- :class:`SwiGLUExperts` (LLM), :class:`ExpertList` (any modules), their base
    expert_bank -- :class:`ExpertBank`, the recommenders' MLP experts (any depth, norm, dropout)
    grouped  -- the grouped matmul every stacked bank multiplies jagged rows with (its one seam)
    gates    -- dense softmax, top-k, noisy top-k, top-p, expert choice, sigmoid+bias
    dispatch -- dense mixing, sparse dropless (grouped matmul), capacity with dropping
    losses   -- load balance, z-loss, CV², entropy (pure functions)
    routing  -- :class:`RoutingResult`, :class:`RoutingStats`, :func:`bin_counts` (sync-free counts)
    routing_sums -- routing statistics of many batches or ranks summed (NaN-safe for empty ones)
    group_counts -- routing counts summed over a process group: aux losses of the global batch
    layer    -- :class:`MoELayer` (one gate), :class:`MultiGateMixture` (one gate per task)
    lora     -- :class:`~mtl.moe.lora.LoRASwiGLUExperts`, per-expert low-rank adapters on a bank
    mixture_of_tokens -- :class:`~mtl.moe.mixture_of_tokens.MixtureOfTokens`, continuous MoE over groups
    expert_parallel -- :class:`ExpertParallelDispatch`, experts sharded over ranks (all-to-all);
        expert_exchange its differentiable exchange, expert_parallel_plan its training plan

Shape suffixes on tensor names (``scores_TE`` is ``(T, E)``), one letter per meaning:

    B  rows of a batch (samples)
    T  tokens routed through a layer (rec layers: T = B; LM: positions flattened to B*T)
    E  experts
    K  slots per token (its routing choices)
    S  slots, S = T*K, token-major: slot t*K + j is token t's j-th choice
    N  slot rows sorted by expert (the dropless dispatch's grouped-matmul rows)
    C  per-expert capacity (rows of a padded per-expert buffer)
    D  input width;  H  hidden width;  O  output width
    G  gates (one per task or unit)
    F  features;  V  vocabulary or table rows
    R  ranks of a process group;  L  experts per rank (E = R*L);  M  rows a rank receives
    P  expert groups of group-limited routing;  Q  experts per group (E = P*Q)
    W  token groups of mixture of tokens;  Z  examples per token group (B = W*Z)
    Y  a low rank: LoRA adapters, HoME's feature gates, MLA's latents
    A  attention (query) heads;  J  key/value heads (A is a multiple of J);  U  width of one head
    X  columns of a fused first-layer product (all experts' E*H units, then any gate logits)
"""

from mtl.moe.dispatch import (
    CapacityDispatch,
    DenseDispatch,
    DispatchResult,
    DroplessDispatch,
    combine_dense,
    combine_dense_many,
)
from mtl.moe.expert_bank import ExpertBank
from mtl.moe.expert_parallel import (
    ExpertParallelDispatch,
    ExpertShard,
    gather_experts,
    parallelize_experts,
    reduce_routing_stats,
    shard_experts,
)
from mtl.moe.experts import ExpertList, SwiGLUExperts
from mtl.moe.gates import (
    DenseSoftmaxGate,
    ExpertChoiceGate,
    NoisyTopKGate,
    Router,
    SigmoidBiasGate,
    TopKGate,
    TopPGate,
)
from mtl.moe.layer import MoELayer, MoEOutput
from mtl.moe.losses import (
    AUX_LOSSES,
    aux_losses,
    cv_squared,
    importance_loss,
    load_balance_loss,
    load_cv_loss,
    router_entropy_loss,
    router_z_loss,
)
from mtl.moe.multi_gate import MultiGateMixture, MultiGateOutput
from mtl.moe.routing import RoutingResult, RoutingStats, bin_counts, routing_stats
from mtl.moe.shared_expert import SigmoidGatedSharedExpert

__all__ = [
    "AUX_LOSSES",
    "CapacityDispatch",
    "DenseDispatch",
    "DenseSoftmaxGate",
    "DispatchResult",
    "DroplessDispatch",
    "ExpertBank",
    "ExpertChoiceGate",
    "ExpertList",
    "ExpertParallelDispatch",
    "ExpertShard",
    "MoELayer",
    "MoEOutput",
    "MultiGateMixture",
    "MultiGateOutput",
    "NoisyTopKGate",
    "Router",
    "RoutingResult",
    "RoutingStats",
    "SigmoidBiasGate",
    "SigmoidGatedSharedExpert",
    "SwiGLUExperts",
    "TopKGate",
    "TopPGate",
    "aux_losses",
    "bin_counts",
    "combine_dense",
    "combine_dense_many",
    "cv_squared",
    "gather_experts",
    "importance_loss",
    "load_balance_loss",
    "load_cv_loss",
    "parallelize_experts",
    "reduce_routing_stats",
    "router_entropy_loss",
    "router_z_loss",
    "routing_stats",
    "shard_experts",
]
