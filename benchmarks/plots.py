"""Plots of the benchmark JSON: every timed round's speed ratio, against the issue's targets.

The machine these benchmarks run on is noisy, and the tables print medians.
A median hides how far the rounds spread, so the plots show every round:
each dot is one round's ratio of two variants timed side by side in that round
(a MoE-layer step, a rec epoch, an LM step), the tick is their median, and a
dashed line is the target where the benchmark issue sets one. Whether a target
is met in most rounds or only in the median is visible at a glance.

Pairing follows how the scripts interleave: ``moe_layer.py`` times round ``r``
of every variant together (``times_s[r]``), ``rec_train.py`` runs epoch ``e`` of
every variant of a seed together (``epoch_times_by_seed[s][e]``), and
``lm_train.py`` runs two steps of each preset per round (``step_times_s[j]``,
round ``j // 2``).

Usage::

    python benchmarks/plots.py benchmarks/out/moe_layer.json [more.json ...] [--dir DIR]

writes ``<name>.png`` next to each JSON (or into ``DIR``). The benchmark scripts call
:func:`plot_file` after writing their JSON (``--no-plot`` skips it). matplotlib
is imported only here, so the benchmarks run without it (as on the GPU
machines) and just skip the plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS_CPU = {"dense": 0.8, "loop": 3.0}
"""moe_layer targets on CPU: mtl's throughput over the dense FFN's and the per-expert loop's."""
TARGETS_CUDA = {"dense": 0.75}
"""moe_layer target on a GPU (bf16): mtl's throughput over the dense FFN's."""
REC_TARGET = 4.0
"""rec_train target: mtl's samples/s over torch-rechub's MMoE at batch 1024."""
AUC_LABEL = "AUC difference"


@dataclass
class Panel:
    """One subplot: groups of per-round ratios along the x axis.

    Args:
        title: subplot title.
        ylabel: what a ratio means (``"mtl tokens/s / dense"``).
        groups: ``{x label: {series: per-round ratios}}``; series of one group
            sit side by side.
        target: dashed horizontal line, or None.
        target_label: its legend entry.

    Example:
        >>> p = Panel(title="mtl vs dense", ylabel="mtl tokens/s / dense", target=0.8)
        >>> p.groups["T=4096"] = {"dense": paired_ratios([1.0, 1.0], [0.8, 0.9])}
        >>> p.groups["T=4096"]["dense"]
        [0.8, 0.9]
    """

    title: str
    ylabel: str
    groups: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    target: float | None = None
    target_label: str = "target"


def paired_ratios(num_s: Sequence[float], den_s: Sequence[float]) -> list[float]:
    """Speed of the ``num`` variant over the ``den`` variant, round by round: ``den_s[r] / num_s[r]``.

    Args:
        num_s, den_s: seconds per unit of work in each round (equal lengths).

    Example:
        >>> paired_ratios([1.0, 2.0], [2.0, 3.0])
        [2.0, 1.5]
    """
    if len(num_s) != len(den_s):
        raise ValueError(f"rounds differ: {len(num_s)} against {len(den_s)}")
    return [d / n for n, d in zip(num_s, den_s, strict=True)]


def moe_layer_panels(payload: Mapping[str, Any]) -> list[Panel]:
    """``mtl / X`` per round for every other variant of each shape; targets for dense and loop."""
    cuda = str(payload.get("env", {}).get("device", "cpu")).startswith("cuda")
    targets = TARGETS_CUDA if cuda else TARGETS_CPU
    panels: dict[str, Panel] = {}
    for point in payload["points"]:
        variants = point["variants"]
        mtl = variants["mtl"]["times_s"]
        label = _shape_label(point["shape"])
        for name, v in variants.items():
            if name == "mtl":
                continue
            key = name if name in targets else "others"
            if key not in panels:
                title = f"mtl vs {name}" if key != "others" else "mtl vs the other variants"
                panels[key] = Panel(
                    title=title,
                    ylabel=f"mtl tokens/s / {name if key != 'others' else 'variant'}",
                    target=targets.get(key),
                )
            panels[key].groups.setdefault(label, {})[name] = paired_ratios(mtl, v["times_s"])
    order = [k for k in ("dense", "loop", "others") if k in panels]
    return [panels[k] for k in order]


def _shape_label(shape: Mapping[str, Any]) -> str:
    return f"E={shape['E']} k={shape['k']}\nT={shape['T']}"


def rec_train_panels(payload: Mapping[str, Any]) -> list[Panel]:
    """Per epoch, each variant's samples/s over rechub's (same seed, same epoch); test AUC by seed."""
    speed = Panel(title="speed vs torch-rechub", ylabel="samples/s / rechub's", target=REC_TARGET)
    auc = Panel(title="test AUC minus rechub's mean, per seed", ylabel=AUC_LABEL)
    for point in payload["points"]:
        rows = {r["impl"]: r for r in point["results"]}
        ref = rows.get("rechub")
        if ref is None:
            continue
        ds = point["dataset"]
        for impl, row in rows.items():
            if impl == "rechub":
                continue
            ratios: list[float] = []
            for mine, theirs in zip(_by_seed(row), _by_seed(ref), strict=True):
                ratios += paired_ratios(mine, theirs)
            speed.groups.setdefault(ds, {})[impl] = ratios
            for task, mean_ref in ref["test_auc"].items():
                diffs = [
                    seed[task] - mean_ref for seed in row.get("test_auc_by_seed", [row["test_auc"]])
                ]
                auc.groups.setdefault(f"{ds}\n{task}", {})[impl] = diffs
    if not speed.groups:
        raise ValueError("rec_train JSON has no rechub rows to compare with")
    auc.target, auc.target_label = 0.0, "rechub's mean"
    return [speed, auc]


def _by_seed(row: Mapping[str, Any]) -> list[list[float]]:
    # JSON written before --seeds existed holds one seed's epochs, unnested
    if "epoch_times_by_seed" in row:
        return row["epoch_times_by_seed"]
    return [row["epoch_times_s"]]


def lm_train_panels(payload: Mapping[str, Any]) -> list[Panel]:
    """Per step, each preset's tokens/s over lm_dense's (steps of one round paired).

    With ``--compile`` rows (``"compiled": true``) the first panel also shows
    each compiled preset over the compiled dense model, and a second panel each
    compiled model over its eager twin.
    """
    eager = {r["preset"]: r for r in payload["results"] if not r.get("compiled")}
    compiled = {r["preset"]: r for r in payload["results"] if r.get("compiled")}
    if "lm_dense" not in eager:
        raise ValueError("lm_train JSON has no lm_dense row to compare with")
    panel = Panel(
        title="MoE presets vs dense LM (same active params)",
        ylabel="tokens/s / lm_dense's",
        target=1.0,
        target_label="dense",
    )
    for name, row in eager.items():
        if name == "lm_dense":
            continue
        group = {"eager": paired_ratios(row["step_times_s"], eager["lm_dense"]["step_times_s"])}
        if name in compiled and "lm_dense" in compiled:
            group["compiled"] = paired_ratios(
                compiled[name]["step_times_s"], compiled["lm_dense"]["step_times_s"]
            )
        panel.groups[name.removeprefix("lm_")] = group
    panels = [panel]
    if compiled:
        twins = Panel(
            title="torch.compile vs eager, same model",
            ylabel="compiled tokens/s / eager's",
            target=1.0,
            target_label="eager",
        )
        for name, row in compiled.items():
            if name in eager:
                twins.groups[name.removeprefix("lm_")] = {
                    "compiled": paired_ratios(row["step_times_s"], eager[name]["step_times_s"])
                }
        panels.append(twins)
    return panels


def panels_for(payload: Mapping[str, Any], source: str = "payload") -> list[Panel]:
    """The panels of a benchmark JSON, recognised by its layout."""
    points = payload.get("points")
    if isinstance(points, list) and points and "shape" in points[0]:
        return moe_layer_panels(payload)
    if isinstance(points, list) and points and "dataset" in points[0]:
        return rec_train_panels(payload)
    results = payload.get("results")
    if isinstance(results, list) and results and "preset" in results[0]:
        return lm_train_panels(payload)
    raise ValueError(
        f"{source}: not the JSON of moe_layer.py ('points' with 'shape'), rec_train.py "
        "('points' with 'dataset') or lm_train.py ('results' with 'preset')"
    )


def draw(panels: Sequence[Panel], title: str) -> Any:
    """A matplotlib figure with one subplot per panel (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [max(4.0, 1.3 * len(p.groups)) for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 4.2), gridspec_kw={"width_ratios": widths}
    )
    axes = [axes] if len(panels) == 1 else list(axes)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes, panels, strict=True):
        series = sorted({s for g in panel.groups.values() for s in g})
        width = 0.8 / max(1, len(series))
        labelled: set[str] = set()
        for x, group in enumerate(panel.groups.values()):
            for i, name in enumerate(series):
                if name not in group:
                    continue
                vals = group[name]
                pos = x - 0.4 + width * (i + 0.5)
                # a small deterministic spread so that equal rounds stay visible
                jitter = [pos + width * 0.3 * ((j % 5) / 4 - 0.5) for j in range(len(vals))]
                colour = colours[i % len(colours)]
                label = None if name in labelled else name
                labelled.add(name)
                ax.scatter(jitter, vals, s=14, alpha=0.7, color=colour, label=label)
                ax.hlines(
                    statistics.median(vals),
                    pos - width * 0.4,
                    pos + width * 0.4,
                    color=colour,
                    lw=2,
                )
        ax.set_xticks(range(len(panel.groups)), list(panel.groups), fontsize=8)
        if panel.target is not None:
            ax.axhline(
                panel.target,
                color="black",
                ls="--",
                lw=1,
                label=f"{panel.target_label} {panel.target:g}",
            )
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_file(json_path: Path, png_path: Path | None = None) -> Path:
    """Read a benchmark JSON and write its plot (default: the same name, ``.png``)."""
    payload = json.loads(Path(json_path).read_text())
    panels = panels_for(payload, str(json_path))
    env = payload.get("env", {})
    seeds = " (AUC: one seed)" if any(p.ylabel == AUC_LABEL for p in panels) else ""
    title = (
        f"{Path(json_path).name}: each dot one timed round{seeds}, each tick their median\n"
        f"{env.get('started', '?')}, commit {env.get('git_commit', '?')}"
        f"{' + uncommitted changes' if env.get('git_dirty') else ''}, {env.get('device', '?')}"
    )
    fig = draw(panels, title)
    out = Path(png_path) if png_path is not None else Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def plot_or_skip(json_path: Path) -> None:
    """What the benchmark scripts call after writing their JSON: plot, or say why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    try:
        print(f"wrote {plot_file(json_path)}")
    except ValueError as err:  # e.g. a run without the reference variant: nothing to pair
        print(f"plot skipped: {err}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot benchmark JSON (one PNG per file).")
    parser.add_argument("json", nargs="+", type=Path, help="JSON written by a benchmark script")
    parser.add_argument(
        "--dir", type=Path, default=None, help="write the PNGs here (default: beside each JSON)"
    )
    args = parser.parse_args(argv)
    for p in args.json:
        png = None if args.dir is None else args.dir / p.with_suffix(".png").name
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_file(p, png)}")


if __name__ == "__main__":
    main()
