"""Parameter names and layouts: transformers checkpoints <-> :class:`TransformerLM` state dicts.

Names shared by both sides (attention projections, norms, dense MLPs) map one
to one; routed experts differ in layout: on disk transformers stores one
``(H, D)`` / ``(D, H)`` Linear weight per expert (``experts.{e}.{gate,up,down}``;
Mixtral names them ``w1, w3, w2``), in memory transformers >= 5 fuses them to
``experts.gate_up_proj (E, 2H, D)`` and ``experts.down_proj (E, D, H)``, and
mtl's :class:`~mtl.moe.SwiGLUExperts` holds ``w_gate, w_up (E, D, H)`` and
``w_down (E, H, D)``. Reading accepts both transformers layouts; writing
produces the on-disk one, which every transformers version loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from mtl.models.lm.hf.spec import Architecture
from mtl.models.lm.transformer import TransformerLM

_EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


class TensorSource(Protocol):
    """Named tensors, read on demand (a safetensors directory or a state dict).

    ``keys()`` lists the names; ``source[name]`` reads one tensor.

    Example:
        >>> source: TensorSource = StateDictSource({"w": torch.zeros(2, 3)})
        >>> [(name, tuple(source[name].shape)) for name in source.keys()]
        [('w', (2, 3))]
    """

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, name: str) -> Tensor: ...


def _layer_name(key: str) -> tuple[int, str] | None:
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    return None if m is None else (int(m.group(1)), m.group(2))


def _expert_param(key: str, moe: set[int]) -> tuple[int, str] | None:
    """``(layer, "w_gate" | "w_up" | "w_down")`` when ``key`` is a routed expert bank's weight."""
    parsed = _layer_name(key)
    if parsed is None or parsed[0] not in moe or not parsed[1].startswith("ffn.experts."):
        return None
    return parsed[0], parsed[1].rsplit(".", 1)[-1]


def _beyond(name: str, n_layers: int) -> bool:
    """A tensor of a layer after the last decoder layer: DeepSeek-V3's multi-token
    prediction module (``num_nextn_predict_layers``), which transformers does not load either."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= n_layers


def hf_name(key: str, arch: Architecture, moe: set[int]) -> str:
    """The transformers name of a non-expert mtl parameter ``key``.

    Example:
        >>> from mtl.models.lm.hf.mixtral import ARCH
        >>> hf_name("layers.0.ffn.gate.proj.weight", ARCH, {0})
        'model.layers.0.block_sparse_moe.gate.weight'
    """
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if key in top:
        return top[key]
    if key == "lm_head.weight":
        return key
    parsed = _layer_name(key)
    if parsed is None:
        raise KeyError(key)
    i, rest = parsed
    base = f"model.layers.{i}."
    for mtl_prefix, hf_prefix in (
        ("attn_norm.", "input_layernorm."),
        ("ffn_norm.", "post_attention_layernorm."),
        ("attn.", "self_attn."),
    ):
        if rest.startswith(mtl_prefix):
            return base + hf_prefix + rest[len(mtl_prefix) :]
    if not rest.startswith("ffn."):
        raise KeyError(key)
    rest = rest[len("ffn.") :]
    if i not in moe:
        return f"{base}mlp.{rest}"
    return base + arch.moe_prefix + "." + moe_block_name(rest, arch)


def moe_block_name(rest: str, arch: Architecture) -> str:
    """Name inside a transformers MoE block of an mtl ``MoELayer`` parameter (non-expert)."""
    if rest == "gate.proj.weight":
        return "gate.weight"
    if rest == "gate.expert_bias_E":
        return "gate.e_score_correction_bias"
    for mtl_prefix, hf_prefix in arch.shared_names:
        if rest.startswith(mtl_prefix):
            return hf_prefix + rest[len(mtl_prefix) :]
    raise KeyError(rest)


def copy_into(dst: Tensor, value: Tensor, what: str) -> None:
    """``dst.copy_(value)`` -- one pass that converts dtype and layout -- after checking
    the shapes match exactly (``copy_`` alone would broadcast a wrong shape)."""
    if value.shape != dst.shape:
        raise ValueError(
            f"{what}: checkpoint shape {tuple(value.shape)}, model shape {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(value)


def copy_experts(
    bank: Mapping[str, Tensor], src: TensorSource, prefix: str, arch: Architecture
) -> set[str]:
    """Copy the routed experts of the block at ``prefix`` (ends in ``.``) into a bank, in place.

    Each expert's weight is read, transposed as a view and copied once into its
    slice of the bank (no stacked intermediate), converted to the bank's dtype
    on the way.

    Args:
        bank: ``w_gate, w_up (E, D, H)`` and ``w_down (E, H, D)``, e.g. a
            :class:`~mtl.moe.SwiGLUExperts`' ``named_parameters()``.
        src: holds the block's experts in either transformers layout.
        prefix: the block's name in ``src``.
        arch: names the per-expert weights.

    Returns:
        The names read from ``src``.

    Raises:
        KeyError: an expert's weight is missing.
        ValueError: a weight's shape does not fit the bank.

    Example:
        >>> from mtl.models.lm.hf.olmoe import ARCH
        >>> from mtl.moe import SwiGLUExperts
        >>> bank = SwiGLUExperts(num_experts=2, d_model=4, d_hidden=3)
        >>> src = StateDictSource({f"experts.{e}.{n}.weight": torch.full(
        ...     (4, 3) if n == "down_proj" else (3, 4), float(e)) for e in range(2)
        ...     for n in ("gate_proj", "up_proj", "down_proj")})
        >>> used = copy_experts(dict(bank.named_parameters()), src, "", ARCH)
        >>> len(used), bank.w_down[1].unique().tolist()
        (6, [1.0])
    """
    names = set(src.keys())
    fused = f"{prefix}experts.gate_up_proj"
    if fused in names:  # transformers >= 5 in memory: (E, 2H, D) gate rows, then up rows
        down = f"{prefix}experts.down_proj"
        gate_up_EhD = src[fused]
        H = gate_up_EhD.shape[1] // 2
        copy_into(bank["w_gate"], gate_up_EhD[:, :H].transpose(1, 2), f"{fused} gate, transposed")
        copy_into(bank["w_up"], gate_up_EhD[:, H:].transpose(1, 2), f"{fused} up, transposed")
        copy_into(bank["w_down"], src[down].transpose(1, 2), f"{down}, transposed")
        return {fused, down}
    used: set[str] = set()
    num_experts = bank["w_gate"].shape[0]
    for param, hf in zip(_EXPERT_PARAMS, arch.expert_names, strict=True):
        for e in range(num_experts):
            name = f"{prefix}experts.{e}.{hf}.weight"
            if name not in names:
                raise KeyError(f"checkpoint lacks {name!r} (expected {num_experts} experts)")
            copy_into(bank[param][e], src[name].T, f"{name}, transposed")
            used.add(name)
    return used


def load_lm_state(lm: TransformerLM, src: TensorSource, arch: Architecture) -> None:
    """Copy a transformers checkpoint's tensors into ``lm`` (built for its config), strictly.

    Every tensor is read from ``src`` when its parameter's turn comes and copied
    once, straight into the parameter (an expert's weight into its slice of the
    bank), converted to the parameter's dtype on the way: loading needs no
    memory beyond ``lm`` and the tensor being copied.

    Raises:
        KeyError: a parameter of ``lm`` has no tensor in ``src``, or ``src``
            holds tensors ``lm`` has no place for (``lm`` is then partly loaded).
        ValueError: a tensor's shape differs from the parameter's.
    """
    moe = set(lm.moe_layers())
    tied = lm.lm_head.weight is lm.embed.weight
    names = set(src.keys())
    used: set[str] = set()
    banks_done: set[int] = set()
    for key, param in lm.state_dict(keep_vars=True).items():
        expert = _expert_param(key, moe)
        if expert is not None:
            i = expert[0]
            if i not in banks_done:
                bank = dict(lm.layers[i].ffn.experts.named_parameters())
                used |= copy_experts(bank, src, f"model.layers.{i}.{arch.moe_prefix}.", arch)
                banks_done.add(i)
            continue
        name = hf_name(key, arch, moe)
        if key == "lm_head.weight" and name not in names and tied:
            continue  # tied: the embedding is the head
        if name not in names:
            raise KeyError(f"checkpoint lacks {name!r} (for mtl parameter {key!r})")
        copy_into(param, src[name], key)
        used.add(name)
    left = sorted(
        n
        for n in names - used
        if not n.endswith("rotary_emb.inv_freq") and not _beyond(n, lm.n_layers)
    )
    if tied:
        left = [n for n in left if n != "lm_head.weight"]
    if left:
        raise KeyError(
            f"checkpoint tensors with no place in the {arch.model_type} model: {left[:5]}"
        )


def hf_state(lm: TransformerLM, arch: Architecture) -> dict[str, Tensor]:
    """``lm``'s parameters under transformers' on-disk names and layouts, as views (no copy).

    An expert's ``(H, D)`` / ``(D, H)`` weight is a transposed slice of mtl's
    ``(E, D, H)`` / ``(E, H, D)`` bank, hence not contiguous; :func:`file_tensors`
    makes the one contiguous copy the file needs.

    Example:
        >>> from mtl.models.lm.hf.mixtral import ARCH
        >>> from mtl.models.lm.hf.spec import HFConfig
        >>> lm = ARCH.build(HFConfig({
        ...     "model_type": "mixtral", "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 1,
        ...     "num_attention_heads": 2, "intermediate_size": 4, "num_local_experts": 3,
        ...     "num_experts_per_tok": 2, "rope_theta": 1e4}))
        >>> w1 = hf_state(lm, ARCH)["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
        >>> tuple(w1.shape), w1.is_contiguous(), torch.equal(w1, lm.layers[0].ffn.experts.w_gate[2].T)
        ((4, 8), False, True)
    """
    moe = set(lm.moe_layers())
    tied = lm.lm_head.weight is lm.embed.weight
    out: dict[str, Tensor] = {}
    for key, value in lm.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        expert = _expert_param(key, moe)
        if expert is None:
            out[hf_name(key, arch, moe)] = value
            continue
        i, param = expert
        hf = arch.expert_names[_EXPERT_PARAMS.index(param)]
        for e, w in enumerate(value.unbind(0)):
            out[f"model.layers.{i}.{arch.moe_prefix}.experts.{e}.{hf}.weight"] = w.T
    return out


def file_tensors(
    tensors: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """``tensors`` as a safetensors file holds them: contiguous, on the CPU, of ``dtype``.

    Each tensor is copied at most once -- a transposed expert slice or a
    parameter of another dtype or device -- and a contiguous CPU tensor of
    ``dtype`` is passed through as it is, unless its memory is already used by
    an earlier one (safetensors refuses tensors that share memory).

    Example:
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> out = file_tensors({"w": w, "t": w.T})
        >>> out["w"].data_ptr() == w.data_ptr(), out["t"].is_contiguous(), torch.equal(out["t"], w.T)
        (True, True, True)
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        as_is = t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
        if not as_is or ptr in seen:
            # ``copy_`` into a fresh tensor converts, moves and packs in one pass
            # (``.to(dtype)`` would keep a transposed layout and need a second copy)
            t = torch.empty(t.shape, dtype=dtype).copy_(t)
        else:
            seen.add(ptr)
        out[name] = t
    return out


class StateDictSource:
    """A :class:`TensorSource` over an in-memory mapping (e.g. a module's ``state_dict()``).

    Args:
        tensors: name -> tensor; copied into a new dict (the tensors are not copied).

    Example:
        >>> src = StateDictSource({"w": torch.ones(2)})
        >>> list(src.keys()), src["w"].tolist()
        (['w'], [1.0, 1.0])
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]
