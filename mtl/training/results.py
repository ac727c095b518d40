"""A run's results: ``metrics.json``, the test scores and the summary printed at the end of ``mtl train``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEST_SCORES_FILE = "test_scores.npz"
"""A ranking run's test predictions and labels per task, beside ``metrics.json``."""


def _finite(value: Any) -> Any:
    # JSON has no NaN; null keeps the file readable by every JSON parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, NaN/inf as null.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "m.json"
        >>> write_json(path, {"auc": float("nan"), "loss": [0.5]})
        >>> json.loads(path.read_text())
        {'auc': None, 'loss': [0.5]}
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def write_test_scores(path: Path, scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Save per-task ``(predictions, labels)`` of the test split as a compressed ``.npz``.

    Predictions are float32; labels uint8 for 0/1 tasks, float32 otherwise. Arrays
    are named ``pred/<task>`` and ``label/<task>``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / TEST_SCORES_FILE
        >>> write_test_scores(path, {"click": (torch.tensor([0.25, 0.5]), torch.tensor([0.0, 1.0]))})
        >>> preds, labels = read_test_scores(path)["click"]
        >>> preds.tolist(), labels.tolist(), labels.dtype.name
        ([0.25, 0.5], [0, 1], 'uint8')
    """
    arrays: dict[str, np.ndarray] = {}
    for task, (preds, labels) in scores.items():
        y = labels.detach().cpu().float().numpy()
        binary = bool(np.isin(y, (0.0, 1.0)).all())
        arrays[f"pred/{task}"] = preds.detach().cpu().float().numpy()
        arrays[f"label/{task}"] = y.astype(np.uint8) if binary else y
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


def read_test_scores(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, ``(predictions, labels)`` as written by :func:`write_test_scores`.

    Read without pickle (``allow_pickle=False``): the file holds plain arrays only.
    """
    with np.load(path, allow_pickle=False) as data:
        tasks = [k.split("/", 1)[1] for k in data.files if k.startswith("pred/")]
        return {t: (data[f"pred/{t}"], data[f"label/{t}"]) for t in tasks}


def _cell(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def rec_summary(result: dict[str, Any]) -> str:
    """Test metrics per task, parameters and time of a ranking run."""
    test = result.get("test", {})
    tasks = list(result.get("tasks", {}))
    metrics = [
        m for m in ("auc", "gauc", "logloss", "mse") if any(f"{m}/{t}" in test for t in tasks)
    ]
    width = max([len(t) for t in tasks] + [4])
    # "tested" says which weights the test saw; results written before it existed: the best.
    weights = (
        f"best checkpoint by {result['monitor']}"
        if result.get("tested", "best checkpoint") == "best checkpoint"
        else "final weights: no best checkpoint was kept"
    )
    lines = [
        f"test metrics ({result['model']}, seed {result['seed']}, {weights}):",
        "task".ljust(width) + "".join(m.rjust(10) for m in metrics),
    ]
    for t in tasks:
        lines.append(
            t.ljust(width) + "".join(_cell(test.get(f"{m}/{t}")).rjust(10) for m in metrics)
        )
    params = result.get("params", {})
    lines.append(
        f"params: {params.get('model', 0):,} model / {params.get('total', 0):,} total; "
        f"train time {result['train_time_s']:.1f} s over {result['epochs']} epochs"
    )
    return "\n".join(lines)


def _ppl(result: dict[str, Any]) -> str:
    # exp(loss) overflows float32 past 88.7 nats/token: say so rather than "n/a".
    if result.get("val_ppl") is None and result.get("val_loss") is not None:
        return "ppl overflows float32: the model diverged"
    return f"ppl {_cell(result.get('val_ppl'))}"


def lm_summary(result: dict[str, Any]) -> str:
    """Validation loss against the data's entropies, size, time and the generated sample."""
    params = result["params"]
    return (
        f"{result['model']}: val loss {_cell(result['val_loss'])} nats/token "
        f"({_ppl(result)}); unigram entropy {result['unigram_entropy']:.4f}, "
        f"bigram {result['bigram_entropy']:.4f}; {result['global_step']} steps in "
        f"{result['train_time_s']:.1f} s; params {params['total']:,} total / "
        f"{params['active']:,} active\nsample:\n{result['sample'][:400]}\n"
    )


def summary(result: dict[str, Any]) -> str:
    """The end-of-run text for ``mtl train``: the kind's summary and the output directory.

    Example:
        >>> print(summary({"kind": "rec", "model": "mmoe", "seed": 0, "monitor": "val/loss",
        ...     "tasks": {"y": "regression"}, "test": {"mse/y": 0.25}, "train_time_s": 1.0,
        ...     "epochs": 1, "params": {"model": 10, "total": 12}, "output_dir": "runs/x"}))
        test metrics (mmoe, seed 0, best checkpoint by val/loss):
        task       mse
        y       0.2500
        params: 10 model / 12 total; train time 1.0 s over 1 epochs
        output: runs/x
    """
    text = lm_summary(result) if result.get("kind") == "lm" else rec_summary(result)
    return f"{text}\noutput: {result['output_dir']}"
