"""The expert/gate abstraction shared by every model in mtl.

Parts:
    experts  -- :class:`ExpertBank` (stacked ``[E, D, H]`` weights), :class:`ExpertList`
    gates    -- dense softmax, top-k, noisy top-k, top-p, expert choice, sigmoid+bias
    dispatch -- dense mixing, sparse dropless (grouped matmul), capacity with dropping
    losses   -- load balance, z-loss, CV², entropy (pure functions)
    routing  -- :class:`RoutingResult`, :class:`RoutingStats`, :func:`bin_counts` (sync-free counts)
    layer    -- :class:`MoELayer` (one gate), :class:`MultiGateMixture` (one gate per task)
    dropout  -- :func:`fast_dropout`, :class:`FastDropout` (cheap CPU masks, used by experts and towers)
    norm_act -- :func:`batch_norm_relu_dropout` (a hidden layer's norm, ReLU and dropout as one node)
"""

from mtl.moe.dispatch import (
    CapacityDispatch,
    DenseDispatch,
    DispatchResult,
    DroplessDispatch,
    combine_dense,
    combine_dense_many,
)
from mtl.moe.dropout import FastDropout, fast_dropout
from mtl.moe.experts import ExpertBank, ExpertList
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
from mtl.moe.norm_act import batch_norm_relu_dropout
from mtl.moe.routing import RoutingResult, RoutingStats, bin_counts, routing_stats

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
    "FastDropout",
    "MoELayer",
    "MoEOutput",
    "MultiGateMixture",
    "MultiGateOutput",
    "NoisyTopKGate",
    "Router",
    "RoutingResult",
    "RoutingStats",
    "SigmoidBiasGate",
    "TopKGate",
    "TopPGate",
    "aux_losses",
    "batch_norm_relu_dropout",
    "bin_counts",
    "combine_dense",
    "combine_dense_many",
    "cv_squared",
    "fast_dropout",
    "importance_loss",
    "load_balance_loss",
    "load_cv_loss",
    "router_entropy_loss",
    "router_z_loss",
    "routing_stats",
]
