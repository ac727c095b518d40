"""What the four supported transformers architectures share: config reading and the LM skeleton."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mtl.models.lm.blocks import RMSNorm
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts


class HFConfig:
    """Read-only view of a transformers ``config.json`` whose errors name the key.

    Args:
        data: the parsed ``config.json`` (or ``PretrainedConfig.to_dict()``).
        source: where it came from, for error messages.

    Example:
        >>> cfg = HFConfig({"model_type": "mixtral", "hidden_size": 16}, source="demo")
        >>> cfg.req("hidden_size"), cfg.get("sliding_window")
        (16, None)
    """

    def __init__(self, data: Mapping[str, Any], *, source: str = "config") -> None:
        self.data = dict(data)
        self.source = source

    @property
    def model_type(self) -> str:
        return str(self.req("model_type"))

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def req(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise ValueError(
                f"{self.source}: key {key!r} is missing (needed for {self.data.get('model_type')})"
            )
        return self.data[key]

    def expect(self, key: str, allowed: Callable[[Any], bool], what: str) -> None:
        """Raise unless ``allowed(value)``: mtl has no equivalent of other settings."""
        value = self.data.get(key)
        if not allowed(value):
            raise ValueError(f"{self.source}: {key}={value!r} is not supported (expected {what})")

    def rope_parameters(self) -> dict[str, Any]:
        """``rope_parameters`` (transformers >= 5) or ``rope_scaling``, with ``rope_type`` set."""
        params = dict(self.get("rope_parameters") or self.get("rope_scaling") or {})
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params

    def rope_theta(self, *, allowed: tuple[str, ...] = ("default",)) -> float:
        """The rotary base; ValueError for a ``rope_type`` outside ``allowed``."""
        params = self.rope_parameters()
        rope_type = params["rope_type"]
        if rope_type not in allowed:
            raise ValueError(
                f"{self.source}: rope_parameters.rope_type={rope_type!r} is not supported "
                f"(expected one of {list(allowed)}; 'default' is plain rotary positions)"
            )
        theta = params.get("rope_theta", self.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{self.source}: key 'rope_parameters.rope_theta' is missing")
        return float(theta)


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps onto :class:`TransformerLM`.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        hf_class: the transformers class ``architectures`` names.
        moe_prefix: the MoE block's name inside a decoder layer.
        expert_names: per-expert Linear names (gate, up, down) on disk.
        shared_names: ``(mtl prefix, transformers prefix)`` pairs of the shared
            expert's parameters inside the MoE block.
        build: ``HFConfig -> TransformerLM`` with the architecture's structure.
        moe_layer: ``HFConfig -> MoELayer``, one MoE block.
        to_config: ``TransformerLM -> config dict`` (raises if the LM does not fit).

    Example:
        >>> from mtl.models.lm.hf import ARCHITECTURES
        >>> ARCHITECTURES["qwen2_moe"].hf_class, ARCHITECTURES["mixtral"].expert_names
        ('Qwen2MoeForCausalLM', ('w1', 'w3', 'w2'))
    """

    model_type: str
    hf_class: str
    moe_prefix: str
    expert_names: tuple[str, str, str]
    shared_names: tuple[tuple[str, str], ...]
    build: Callable[[HFConfig], TransformerLM]
    moe_layer: Callable[[HFConfig], MoELayer]
    to_config: Callable[[TransformerLM], dict[str, Any]]


def check_common(cfg: HFConfig) -> None:
    """Settings every supported architecture must have for an exact mtl equivalent."""
    cfg.expect("hidden_act", lambda v: v in (None, "silu"), "'silu'")
    cfg.expect("quantization_config", lambda v: v is None, "none: dequantize the weights first")
    head_dim = cfg.get("head_dim")
    natural = cfg.req("hidden_size") // cfg.req("num_attention_heads")
    if cfg.model_type != "deepseek_v3" and head_dim not in (None, natural):
        raise ValueError(
            f"{cfg.source}: head_dim={head_dim} is not supported (expected hidden_size / "
            f"num_attention_heads = {natural})"
        )


def lm_kwargs(cfg: HFConfig, *, rope_types: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    """The :class:`TransformerLM` arguments every architecture reads the same way."""
    check_common(cfg)
    return {
        "vocab_size": int(cfg.req("vocab_size")),
        "d_model": int(cfg.req("hidden_size")),
        "n_layers": int(cfg.req("num_hidden_layers")),
        "n_heads": int(cfg.req("num_attention_heads")),
        "n_kv_heads": cfg.get("num_key_value_heads"),
        "d_ff": int(cfg.get("intermediate_size", 1)),
        "max_seq_len": int(cfg.get("max_position_embeddings", 4096)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rope_base": cfg.rope_theta(allowed=rope_types),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "dropout": 0.0,
    }


def routed_experts(
    cfg: HFConfig, *, num_experts: int, d_hidden: int
) -> tuple[SwiGLUExperts, DroplessDispatch]:
    """The routed SwiGLU bank (dropless, as every transformers MoE block computes)."""
    bank = SwiGLUExperts(
        num_experts=num_experts, d_model=int(cfg.req("hidden_size")), d_hidden=d_hidden
    )
    return bank, DroplessDispatch()


def base_config(lm: TransformerLM, arch: Architecture) -> dict[str, Any]:
    """The ``config.json`` keys every architecture writes the same way."""
    attn = lm.layers[0].attn
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.d_model,
        "num_hidden_layers": lm.n_layers,
        "num_attention_heads": attn.n_heads,
        "max_position_embeddings": lm.max_seq_len,
        "rms_norm_eps": lm.norm.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(attn.rope.base)},
        "tie_word_embeddings": lm.lm_head.weight is lm.embed.weight,
        "hidden_act": "silu",
        "dtype": "float32",
        "attention_dropout": 0.0,
    }


def need(condition: bool, what: str, arch: str) -> None:
    """Raise ValueError when an LM cannot be written as ``arch``."""
    if not condition:
        raise ValueError(f"this TransformerLM cannot be exported as {arch}: {what}")


def check_norm_eps(
    lm: TransformerLM, arch: str, *, fixed: Mapping[str, float] | None = None
) -> None:
    """One RMSNorm epsilon in the whole LM (transformers configs have one ``rms_norm_eps``).

    Args:
        lm: the model to write.
        arch: its ``model_type``, for the error message.
        fixed: norms whose epsilon transformers does not read from the config but
            fixes, by the last part of their name (e.g. ``{"kv_a_layernorm": 1e-6}``):
            they must have that epsilon and do not count as the one of the config.
    """
    fixed = fixed or {}
    eps: set[float] = set()
    for name, m in lm.named_modules():
        if not isinstance(m, RMSNorm):
            continue
        short = name.rsplit(".", 1)[-1]
        if short in fixed:
            need(
                m.eps == fixed[short],
                f"{name} has epsilon {m.eps}; transformers fixes it to {fixed[short]}",
                arch,
            )
        else:
            eps.add(m.eps)
    need(len(eps) == 1, f"RMSNorm epsilons differ: {sorted(eps)}", arch)


def moe_parts(lm: TransformerLM, arch: str) -> dict[int, MoELayer]:
    """The MoE layers, each checked to be a dropless SwiGLU bank with ``output_scale`` 1."""
    layers = lm.moe_layers()
    need(bool(layers), "it has no MoE layer", arch)
    for i, layer in layers.items():
        need(
            isinstance(layer.experts, SwiGLUExperts),
            f"layer {i} experts are not SwiGLUExperts",
            arch,
        )
        need(layer.experts.hidden_mask_EH is None, f"layer {i} experts have unequal widths", arch)
        need(
            isinstance(layer.dispatch, DroplessDispatch),
            f"layer {i} dispatch is not dropless",
            arch,
        )
        need(layer.output_scale == 1.0, f"layer {i} output_scale is {layer.output_scale}", arch)
    return layers


def check_shared(
    layers: Mapping[int, MoELayer], arch: str, allowed: Callable[[Any], bool], what: str
) -> None:
    """Every MoE layer's shared part (None if it has none) passes ``allowed``; ``what`` says
    which ones do, for the error message."""
    for i, layer in layers.items():
        found = "no shared expert" if layer.shared is None else type(layer.shared).__name__
        need(allowed(layer.shared), f"layer {i} has {found}; {arch} needs {what}", arch)


def one_value(values: list[Any], what: str, arch: str) -> Any:
    """The single value all MoE layers share (transformers configs have one)."""
    need(len(set(values)) == 1, f"{what} differs between MoE layers: {values}", arch)
    return values[0]


def dense_width(lm: TransformerLM) -> int | None:
    """Hidden width of the dense FFN layers (None if every layer is MoE)."""
    moe = lm.moe_layers()
    widths = {blk.ffn.d_hidden for i, blk in enumerate(lm.layers) if i not in moe}
    if len(widths) > 1:
        raise ValueError(f"dense layers have different widths {sorted(widths)}")
    return next(iter(widths), None)
