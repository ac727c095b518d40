"""``mtl merge CKPT... --weights W... --out PATH``: weighted parameter averaging (LM-Cocktail).

Checkpoints of the same architecture (same parameter names and shapes) are
merged into ``theta = sum_i w_i theta_i`` (Xiao et al. 2023, "LM-Cocktail:
resilient tuning of language models via model merging"): e.g. a fine-tuned
model with its base model, to keep the base's general ability. Integer
tensors (counters) are taken from the first checkpoint.

With ``--auto --examples FILE`` the weights come from each model's mean
next-token loss ``L_i`` on a few examples of the target domain, as
LM-Cocktail computes them: ``w = softmax(-L / temperature)`` (temperature 5 in
its code), so the model that fits the examples best weighs most.

Before any weight is averaged the checkpoints must be of one model class, one
tokenizer and one model config (``net_config``: e.g. two MoE LMs of the same
shapes but another ``moe.gate.k`` are refused, naming the key and both values).

The merged file is the first checkpoint with the averaged weights and without
optimiser and scheduler state: :func:`mtl.training.build.load_module` and
``mtl generate`` read it like any run's checkpoint. It is written to a temporary
file beside ``--out`` and renamed, so a crash never leaves half a file; ``--out``
may not be one of the inputs, nor an existing file without ``--force``. User
errors raise ValueError / FileNotFoundError, which ``mtl`` prints as one
``error:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl.training.checkpoints import differences, read_checkpoint

WEIGHT_SUM_TOLERANCE = 1e-6
DEFAULT_TEMPERATURE = 5.0
# Keys of a Lightning checkpoint that describe the training that produced it, not the model.
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def check_weights(weights: Sequence[float], n_checkpoints: int) -> list[float]:
    """The merge weights, checked: one per checkpoint, each >= 0, summing to 1.

    Raises:
        ValueError: naming what is wrong.

    Example:
        >>> check_weights([0.25, 0.75], 2)
        [0.25, 0.75]
    """
    w = [float(x) for x in weights]
    if len(w) != n_checkpoints:
        raise ValueError(
            f"--weights needs one weight per checkpoint: got {len(w)} for {n_checkpoints}"
        )
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"--weights must be finite and >= 0, got {w}")
    if abs(sum(w) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"--weights must sum to 1, got {w} (sum {sum(w):g})")
    return w


def cocktail_weights(
    losses: Sequence[float], temperature: float = DEFAULT_TEMPERATURE
) -> list[float]:
    """LM-Cocktail's merge weights: ``softmax(-losses / temperature)``.

    Example:
        >>> [round(w, 3) for w in cocktail_weights([1.0, 1.0])]
        [0.5, 0.5]
        >>> w = cocktail_weights([0.5, 2.0], temperature=1.0); w[0] > w[1]
        True
    """
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    losses_N = torch.tensor([float(x) for x in losses], dtype=torch.float64)
    return torch.softmax(-losses_N / temperature, dim=0).tolist()


def merge_state_dicts(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], names: Sequence[str]
) -> dict[str, Tensor]:
    """``sum_i w_i state_i`` for floating tensors; integer tensors from the first state.

    Args:
        states: the models' state dicts, same keys and shapes.
        weights: one weight per state (see :func:`check_weights`).
        names: the states' sources, for error messages.

    Raises:
        ValueError: a parameter missing from one state, or of another shape or dtype,
            named with the checkpoint.

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> merge_state_dicts([a, b], [0.25, 0.75], ["a", "b"])["w"].tolist()
        [0.75, 0.75]
    """
    first, first_name = states[0], names[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        missing = sorted(set(first) - set(state))
        extra = sorted(set(state) - set(first))
        if missing or extra:
            key = (missing or extra)[0]
            where = name if missing else first_name
            raise ValueError(
                f"cannot merge {name} with {first_name}: parameter {key!r} is missing from {where} "
                "(the checkpoints must have the same architecture)"
            )
        for key, tensor in first.items():
            other = state[key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ValueError(
                    f"cannot merge {name} with {first_name}: parameter {key!r} is "
                    f"{tuple(other.shape)} {other.dtype} there and {tuple(tensor.shape)} {tensor.dtype} "
                    "here (the checkpoints must have the same architecture)"
                )
    merged: dict[str, Tensor] = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            merged[key] = tensor.clone()
            continue
        # accumulate in float64 so that merging a model with itself is exact
        acc = torch.zeros(tensor.shape, dtype=torch.float64)
        for w, state in zip(weights, states, strict=True):
            acc += w * state[key].double()
        merged[key] = acc.to(tensor.dtype)
    return merged


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """The examples of ``--examples``: ``(prompt, text)`` pairs, the loss taken on ``text``.

    A ``.jsonl`` file holds one ``{"input": ..., "output": ...}`` object per line
    (LM-Cocktail's format; the loss is on the output given the input); any other
    file holds one example per non-empty line (loss on every token after the first).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, or a JSON line without ``output``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--examples file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--examples file {path} holds no example")
    if path.suffix != ".jsonl":
        return [("", line) for line in lines]
    examples = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("output"), str):
            raise ValueError(f'{path}:{n} needs {{"input": ..., "output": ...}} with a text output')
        examples.append((str(record.get("input", "")), record["output"]))
    return examples


def examples_loss(module: Any, examples: Sequence[tuple[str, str]]) -> float:
    """Mean next-token cross-entropy of an LM module on the examples' target tokens.

    Args:
        module: an :class:`~mtl.training.lm_module.LMModule` with its tokenizer.
        examples: ``(prompt, text)`` pairs; tokens of ``text`` are scored given
            the prompt (truncated on the left to the model's context).
    """
    net, tok = module.net, module.tokenizer
    if tok is None:
        raise ValueError("--auto needs checkpoints that hold their tokenizer (LM runs)")
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, text in examples:
            prompt_ids = tok.encode(prompt) if prompt else torch.zeros(0, dtype=torch.long)
            ids = torch.cat([prompt_ids, tok.encode(text)])[-(net.max_seq_len + 1) :]
            n_target = min(len(ids) - 1, len(ids) - len(prompt_ids))
            if n_target < 1:
                continue
            logits_1TV = net(ids[:-1].unsqueeze(0)).logits
            loss_T = torch.nn.functional.cross_entropy(
                logits_1TV[0].float(), ids[1:], reduction="none"
            )
            total += float(loss_T[-n_target:].sum())
            count += n_target
    if count == 0:
        raise ValueError("the examples hold no token to score (each needs two tokens or more)")
    return total / count


def check_out(out: str | Path, paths: Sequence[str | Path], *, force: bool = False) -> Path:
    """``out``, checked before anything is read: not one of ``paths``, not existing unless ``force``.

    Raises:
        ValueError: ``out`` is one of the inputs (even with ``force``: the merge would
            replace a model it reads), or exists and ``force`` is false.

    Example:
        >>> check_out("merged.ckpt", ["a.ckpt", "b.ckpt"])  # doctest: +SKIP
        PosixPath('merged.ckpt')
    """
    out = Path(out)
    for path in paths:
        same = Path(path).resolve() == out.resolve()
        if not same and out.exists() and Path(path).exists():
            same = os.path.samefile(path, out)  # a hard link or another spelling
        if same:
            raise ValueError(
                f"--out {out} is one of the checkpoints to merge ({path}); write elsewhere"
            )
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    return out


def _model_class(checkpoint: Mapping[str, Any]) -> str:
    """The class name of the checkpoint's network, from its ``net_config`` ``_target_``."""
    target = ((checkpoint.get("hyper_parameters") or {}).get("net_config") or {}).get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else "network without net_config"


def _a(name: str) -> str:
    return f"an {name}" if name[:1] in "AEIOU" else f"a {name}"


def read_compatible(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The checkpoints ``paths``, checked to be one model: class, then tokenizer, then config.

    Weights are compared by :func:`merge_state_dicts`; this compares what the
    weights alone do not show (two MoE LMs of the same shapes may route with
    another ``k``).

    Raises:
        ValueError: naming both files and what differs
            (``moe.gate.k: a.ckpt 2, b.ckpt 1``).
        CheckpointError: an unreadable checkpoint.
    """
    names = [str(p) for p in paths]
    checkpoints = [read_checkpoint(p, require=("state_dict",)) for p in names]
    first, first_name = checkpoints[0], names[0]
    for checkpoint, name in zip(checkpoints[1:], names[1:], strict=True):
        cls, other_cls = _model_class(first), _model_class(checkpoint)
        if cls != other_cls:
            raise ValueError(f"cannot merge: {first_name} is {_a(cls)}, {name} {_a(other_cls)}")
        fingerprints = [
            (c.get("lm_tokenizer") or {}).get("fingerprint") for c in (first, checkpoint)
        ]
        if fingerprints[0] != fingerprints[1]:
            raise ValueError(
                f"cannot merge LMs with different tokenizers: {first_name} and {name} "
                "(their token ids differ)"
            )
        configs = [
            _model_keys((c.get("hyper_parameters") or {}).get("net_config"))
            for c in (first, checkpoint)
        ]
        diffs = differences(*configs, names=(first_name, name))
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise ValueError(
                f"cannot merge models of different configs: {'; '.join(diffs[:3])}{more}"
            )
    return checkpoints


def write_merged(
    checkpoints: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    weights: Sequence[float],
    out: Path,
) -> Path:
    """Average ``checkpoints`` into ``out``: a temporary file beside it, then a rename.

    Raises:
        ValueError: different architectures, or ``out`` cannot be written.
    """
    merged = dict(checkpoints[0])
    for key in TRAINING_STATE_KEYS:
        merged.pop(key, None)
    merged["state_dict"] = merge_state_dicts([c["state_dict"] for c in checkpoints], weights, names)
    merged["merge"] = {"checkpoints": list(names), "weights": list(weights)}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(merged, tmp)
        # The rename is atomic: a crash mid-save leaves no half-written --out.
        os.replace(tmp, out)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ValueError(f"could not write --out {out} ({reason})") from None
    return out


def _model_keys(config: Any) -> Any:
    """``config`` without the keys that change only training (dropout) or the longest input
    (``max_seq_len``, from the run's block size), not what the merged weights compute."""
    if isinstance(config, Mapping):
        return {
            k: _model_keys(v)
            for k, v in config.items()
            if not (str(k) == "max_seq_len" or str(k).endswith("dropout"))
        }
    if isinstance(config, list | tuple):
        return [_model_keys(v) for v in config]
    return config


def merge_checkpoints(
    paths: Sequence[str | Path], weights: Sequence[float], out: str | Path, *, force: bool = False
) -> Path:
    """Write the weighted average of the checkpoints ``paths`` to ``out``.

    Args:
        paths: checkpoints of one model class, tokenizer and config.
        weights: one per checkpoint, summing to 1.
        out: the merged checkpoint; never one of ``paths``.
        force: replace an existing ``out``.

    Raises:
        ValueError: bad weights or ``out``, different classes, configs, architectures
            or vocabularies.
        CheckpointError: an unreadable checkpoint.
    """
    names = [str(p) for p in paths]
    out = check_out(out, names, force=force)
    weights = check_weights(weights, len(names))
    return write_merged(read_compatible(names), names, weights, out)


def check_auto(checkpoints: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """Raise unless every checkpoint is a language model holding its tokenizer (``--auto``)."""
    for checkpoint, name in zip(checkpoints, names, strict=True):
        if checkpoint.get("lm_tokenizer") is None:
            cls = _model_class(checkpoint)
            without = " without its tokenizer" if cls.endswith("LM") else ""
            raise ValueError(
                f"--auto needs language-model checkpoints; {name} is {_a(cls)}{without}"
            )


def auto_weights(
    paths: Sequence[str | Path], examples_path: str | Path, temperature: float
) -> tuple[list[float], list[float]]:
    """``(weights, losses)``: each checkpoint's loss on the examples, and their softmax."""
    from mtl.training.build import load_module

    examples = read_examples(examples_path)
    losses = [examples_loss(load_module(p), examples) for p in paths]
    return cocktail_weights(losses, temperature), losses


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl merge",
        description="Average the parameters of same-architecture checkpoints (LM-Cocktail).",
        epilog="examples:\n"
        "  mtl merge a.ckpt b.ckpt --weights 0.7 0.3 --out merged.ckpt\n"
        "  mtl merge tuned.ckpt base.ckpt --auto --examples domain.txt --out merged.ckpt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", help="Lightning checkpoints of the same architecture")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint, sum 1")
    p.add_argument("--auto", action="store_true", help="weights from the losses on --examples")
    p.add_argument("--examples", help="examples: one per line, or .jsonl of {input, output}")
    p.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="of the --auto softmax"
    )
    p.add_argument("--out", required=True, help="the merged checkpoint to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def main(argv: Sequence[str]) -> int:
    """The ``mtl merge`` sub-command; prints the weights and the output path."""
    args = _parser().parse_args(list(argv))
    if args.auto == (args.weights is not None):
        raise ValueError("give either --weights W... or --auto --examples FILE")
    if args.auto and not args.examples:
        raise ValueError("--auto needs --examples FILE")
    names = list(args.checkpoints)
    # Every check before the (slow) --auto losses and the write.
    out = check_out(args.out, names, force=args.force)
    weights = None if args.auto else check_weights(args.weights, len(names))
    checkpoints = read_compatible(names)
    if args.auto:
        check_auto(checkpoints, names)
        weights, losses = auto_weights(names, args.examples, args.temperature)
        for path, loss, w in zip(names, losses, weights, strict=True):
            print(f"{path}: loss {loss:.4f} -> weight {w:.4f}")
    assert weights is not None
    out = write_merged(checkpoints, names, weights, out)
    print(f"merged {len(args.checkpoints)} checkpoints -> {out}")
    return 0
