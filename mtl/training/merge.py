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

The merged file is the first checkpoint with the averaged weights and without
optimiser and scheduler state: :func:`mtl.training.build.load_module` and
``mtl generate`` read it like any run's checkpoint. User errors raise
ValueError / FileNotFoundError, which ``mtl`` prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl.training.checkpoints import read_checkpoint

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


def merge_checkpoints(
    paths: Sequence[str | Path], weights: Sequence[float], out: str | Path
) -> Path:
    """Write the weighted average of the checkpoints ``paths`` to ``out``.

    Raises:
        ValueError: bad weights, different architectures or vocabularies.
        CheckpointError: an unreadable checkpoint.
    """
    names = [str(p) for p in paths]
    weights = check_weights(weights, len(names))
    checkpoints = [read_checkpoint(p, require=("state_dict",)) for p in names]
    fingerprints = {(c.get("lm_tokenizer") or {}).get("fingerprint") for c in checkpoints}
    if len(fingerprints) > 1:
        raise ValueError("cannot merge LMs with different tokenizers (their token ids differ)")
    merged = dict(checkpoints[0])
    for key in TRAINING_STATE_KEYS:
        merged.pop(key, None)
    merged["state_dict"] = merge_state_dicts([c["state_dict"] for c in checkpoints], weights, names)
    merged["merge"] = {"checkpoints": names, "weights": weights}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(merged, out)
    return out


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
    return p


def main(argv: Sequence[str]) -> int:
    """The ``mtl merge`` sub-command; prints the weights and the output path."""
    args = _parser().parse_args(list(argv))
    if args.auto == (args.weights is not None):
        raise ValueError("give either --weights W... or --auto --examples FILE")
    if args.auto:
        if not args.examples:
            raise ValueError("--auto needs --examples FILE")
        weights, losses = auto_weights(args.checkpoints, args.examples, args.temperature)
        for path, loss, w in zip(args.checkpoints, losses, weights, strict=True):
            print(f"{path}: loss {loss:.4f} -> weight {w:.4f}")
    else:
        weights = args.weights
    out = merge_checkpoints(args.checkpoints, weights, args.out)
    print(f"merged {len(args.checkpoints)} checkpoints -> {out}")
    return 0
