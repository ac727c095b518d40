"""Read and write transformers checkpoint directories (``config.json`` + safetensors) as mtl LMs.

No transformers import and no network: the config is plain JSON and the tensors
are read with :mod:`safetensors`, lazily, one at a time (sharded checkpoints via
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtl.models.lm.hf import deepseek_v3, mixtral, olmoe, qwen2_moe
from mtl.models.lm.hf.spec import Architecture, HFConfig
from mtl.models.lm.hf.weights import (
    StateDictSource,
    copy_experts,
    copy_into,
    file_tensors,
    hf_state,
    load_lm_state,
    moe_block_name,
)
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (mixtral.ARCH, olmoe.ARCH, qwen2_moe.ARCH, deepseek_v3.ARCH)
}
"""The supported ``model_type`` values."""


def architecture(model_type: str) -> Architecture:
    """The :class:`Architecture` of a ``model_type``; ValueError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


class SafetensorsSource:
    """The tensors of a checkpoint directory, read on demand.

    Args:
        directory: holds ``model.safetensors``, or shards listed in
            ``model.safetensors.index.json``.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp())
        >>> save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))
        >>> SafetensorsSource(d)["w"].tolist()
        [1.0, 1.0]
    """

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = _read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' mapping tensor names to files")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{directory}: no *.safetensors file (only safetensors checkpoints are read)"
                )
            weight_map = {}
        self._handles = {f: _open_safetensors(directory / f) for f in files}
        if not weight_map:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}  # noqa: SIM118 (a safetensors handle is not iterable)
        self._where = weight_map

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __getitem__(self, name: str) -> Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _open_safetensors(path: Path) -> Any:
    """A lazy handle on ``path``; ValueError naming the file when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (listed in the safetensors index)")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        # typically a truncated download: the header promises more bytes than the file has
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def read_config(directory: str | Path) -> HFConfig:
    """``directory/config.json`` as an :class:`HFConfig`; FileNotFoundError naming the path."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a transformers checkpoint directory")
    return HFConfig(_read_json(path), source=str(path))


def load_hf_checkpoint(
    directory: str | Path, *, dtype: torch.dtype = torch.float32
) -> TransformerLM:
    """A :class:`TransformerLM` with the weights of a local transformers checkpoint.

    Supported ``model_type``: mixtral, olmoe, qwen2_moe, deepseek_v3 (see
    :data:`ARCHITECTURES`). Settings without an exact mtl equivalent (sliding
    windows, scaled rotary positions, q/k/v clipping, router jitter) are refused
    with a ValueError naming the key.

    Args:
        directory: holds ``config.json`` and ``*.safetensors``.
        dtype: parameter dtype of the returned model.

    Returns:
        The model in eval mode; its logits equal transformers' (float32: within 1e-5).
        Its parameters are built in ``dtype`` and each file tensor is copied
        into them once, converted on the way; the file is read lazily, one
        tensor at a time.

    Example:
        >>> lm = load_hf_checkpoint("path/to/OLMoE-1B-7B")  # doctest: +SKIP
    """
    cfg = read_config(directory)
    arch = architecture(cfg.model_type)
    # converted before loading, so that the file's values are converted once, not via float32
    lm = arch.build(cfg).to(dtype)
    load_lm_state(lm, SafetensorsSource(Path(directory)), arch)
    return lm.eval()


def save_hf_checkpoint(
    lm: TransformerLM,
    directory: str | Path,
    *,
    model_type: str,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``lm`` as a transformers checkpoint directory that ``from_pretrained`` loads.

    Args:
        lm: the model; its structure must fit ``model_type`` (a ValueError says
            what does not, e.g. a gate transformers' block does not have).
        directory: created if missing; ``config.json`` and ``model.safetensors``
            are written into it.
        model_type: one of :data:`ARCHITECTURES`.
        extra_config: more ``config.json`` keys (token ids, ...); they may not
            override the ones derived from ``lm``.

    Returns:
        The directory.

    Example:
        >>> save_hf_checkpoint(lm, "out/mixtral", model_type="mixtral")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    arch = architecture(model_type)
    config = arch.to_config(lm)
    clash = set(extra_config or {}) & set(config)
    if clash:
        raise ValueError(
            f"extra_config may not override {sorted(clash)} (they follow from the model)"
        )
    config.update(extra_config or {})
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # views of the parameters, then one float32 contiguous copy of what needs one
    tensors = file_tensors(hf_state(lm, arch), dtype=torch.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def moe_layer_from_hf_block(block: nn.Module, config: Mapping[str, Any] | Any) -> MoELayer:
    """An :class:`~mtl.moe.MoELayer` equal to a transformers MoE block of a supported architecture.

    Args:
        block: ``MixtralSparseMoeBlock``, ``OlmoeSparseMoeBlock``,
            ``Qwen2MoeSparseMoeBlock`` or ``DeepseekV3MoE`` (either weight layout).
        config: the model's config (a ``PretrainedConfig`` or its dict).

    Example:
        >>> layer = moe_layer_from_hf_block(model.model.layers[1].mlp, model.config)  # doctest: +SKIP
    """
    data = config if isinstance(config, Mapping) else config.to_dict()
    cfg = HFConfig(data, source=f"{type(block).__name__} config")
    arch = architecture(cfg.model_type)
    layer = arch.moe_layer(cfg).to(next(block.parameters()).dtype)
    src = StateDictSource(block.state_dict())
    copy_experts(dict(layer.experts.named_parameters()), src, "", arch)
    for key, value in layer.state_dict(keep_vars=True).items():
        if not key.startswith("experts."):
            copy_into(value, src[moe_block_name(key, arch)], key)
    return layer.eval()
