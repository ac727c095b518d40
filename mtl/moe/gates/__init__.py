"""Gates (routers): every one maps ``(T, D)`` tokens to a :class:`RoutingResult`."""

from mtl.moe.gates.base import Router
from mtl.moe.gates.constant_gate import ConstantGate
from mtl.moe.gates.dense import DenseSoftmaxGate
from mtl.moe.gates.dynamic import ExpertChoiceGate, TopPGate
from mtl.moe.gates.self_gate import SelfGate
from mtl.moe.gates.sigmoid import SigmoidBiasGate
from mtl.moe.gates.topk import NoisyTopKGate, TopKGate

__all__ = [
    "ConstantGate",
    "DenseSoftmaxGate",
    "ExpertChoiceGate",
    "NoisyTopKGate",
    "Router",
    "SelfGate",
    "SigmoidBiasGate",
    "TopKGate",
    "TopPGate",
]
