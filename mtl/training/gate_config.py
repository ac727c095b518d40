"""Gates chosen from config: the ``conf/gate`` group under a model's ``gate`` key.

Rankers (MMoE, OMoE, PLE, HoME) take their gate at ``model.gate``, language models
at ``model.moe.gate``; both are filled from ``conf/gate/<name>.yaml`` by the model
config's defaults list (``- /gate@gate: dense_softmax``). Hydra selects such a
nested group only by its full name (``gate@model.gate=top_k``), so
:func:`gate_overrides` rewrites the natural ``model.gate=top_k`` into it, and
:func:`gate_name` reads back the gate a built network actually uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl.training.config import ConfigError, available, conf_dir

GATE_GROUP = "gate"
"""The config group of the gates (``conf/gate/*.yaml``)."""

# A plain value override of a key named gate under model: `model.gate=top_k`, `model.moe.gate=x`.
_GATE_KEY = re.compile(r"^(?P<key>model(?:\.[A-Za-z_]\w*)*\.gate)=(?P<value>[^=]*)$")
_NAME = re.compile(r"^[A-Za-z_][\w-]*$")

_GATE_NAMES = {
    "DenseSoftmaxGate": "dense_softmax",
    "TopKGate": "top_k",
    "NoisyTopKGate": "noisy_top_k",
    "TopPGate": "top_p",
    "ExpertChoiceGate": "expert_choice",
    "SigmoidBiasGate": "sigmoid_bias",
}


def gate_overrides(overrides: Sequence[str], root: Path | None = None) -> list[str]:
    """``overrides`` with each gate choice written as Hydra's nested group override.

    Args:
        overrides: Hydra override strings.
        root: the config directory (default :func:`~mtl.training.config.conf_dir`).

    Raises:
        ConfigError: a gate key names no ``conf/gate`` file.

    Example:
        >>> gate_overrides(["model=mmoe", "model.gate=top_k", "model.gate.k=2"])
        ['model=mmoe', 'gate@model.gate=top_k', 'model.gate.k=2']
    """
    names = available(GATE_GROUP, root)
    out = []
    for item in overrides:
        match = _GATE_KEY.match(item)
        value = None if match is None else match["value"].strip()
        if match is None or value in ("", "null") or not _NAME.match(value or ""):
            out.append(item)
            continue
        if value not in names:
            raise ConfigError(
                f"unknown gate {value!r} for {match['key']}; "
                f"available gate configs: {', '.join(names) or '(none)'}"
            )
        out.append(f"{GATE_GROUP}@{match['key']}={value}")
    return out


def gate_choices(cfg: DictConfig) -> dict[str, str]:
    """``{config key: gate config name}`` of the composed config's gate groups.

    Read from Hydra's record of the choices, so ``cfg`` must still hold ``hydra``.
    """
    choices = cfg.hydra.runtime.choices
    prefix = f"{GATE_GROUP}@"
    return {
        str(k)[len(prefix) :]: str(v)
        for k, v in choices.items()
        if str(k).startswith(prefix) and v is not None
    }


def name_with_gate(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Append the gate chosen on the command line to the run's name (``mmoe-top_k``).

    Nothing changes without a gate override, or when ``name`` is set explicitly.
    """
    if any(o.lstrip("+~").startswith("name=") for o in overrides):
        return
    chosen = [o.split("=", 1)[0][len(GATE_GROUP) + 1 :] for o in overrides]
    picked = gate_choices(cfg)
    gates = [picked[key] for key in chosen if key in picked]
    if gates:
        name = OmegaConf.to_container(cfg, resolve=False)["name"]  # type: ignore[index]
        cfg.name = "-".join([str(name), *gates])


def gate_name(net: nn.Module) -> str | None:
    """The gate kind a built network routes with (``"top_k"``), None when it has no gate.

    Several kinds are joined with ``+``. Masked gates count as the gate they wrap;
    HoME's self gates are part of the model, not its gate choice.

    Example:
        >>> from mtl.models.rec import MMoE
        >>> gate_name(MMoE(d_in=4, tasks=["click"], expert_hidden=[8]))
        'dense_softmax'
    """
    from mtl.moe.layer import MoELayer
    from mtl.moe.multi_gate import MaskedGate, MultiGateMixture

    kinds: list[str] = []
    for module in net.modules():
        gates: list[Any] = []
        if isinstance(module, MultiGateMixture):
            gates = list(module.gates.values())
        elif isinstance(module, MoELayer):
            gates = [module.gate]
        for g in gates:
            g = g.gate if isinstance(g, MaskedGate) else g
            kind = _GATE_NAMES.get(type(g).__name__, type(g).__name__)
            if kind not in kinds:
                kinds.append(kind)
    return "+".join(kinds) or None


def model_config(name: str, root: Path | None = None) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` with its defaults (the gate) applied, as a plain dict.

    What ``mtl train model=<name>`` puts under ``model`` (interpolations unresolved).

    Example:
        >>> model_config("mmoe")["gate"]["_target_"]
        'mtl.moe.DenseSoftmaxGate'
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(
        version_base="1.3", config_dir=str(root or conf_dir()), job_name="mtl"
    ):
        cfg = compose(config_name=f"model/{name}")
    out = OmegaConf.to_container(cfg.model, resolve=False)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
