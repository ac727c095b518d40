"""benchmarks/plots.py: round-paired ratios from each benchmark's JSON, drawn dot for dot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import plots
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _moe_payload(device: str = "cpu") -> dict:
    def point(T: int, mtl: list[float], dense: list[float], loop: list[float]) -> dict:
        return {
            "shape": {"E": 64, "k": 8, "D": 512, "H": 256, "T": T},
            "variants": {
                "mtl": {"times_s": mtl},
                "dense": {"times_s": dense},
                "loop": {"times_s": loop},
            },
        }

    return {
        "env": {"device": device},
        "points": [
            point(4096, [1.0, 2.0, 4.0], [0.5, 2.0, 4.0], [2.0, 2.0, 8.0]),
            point(16384, [2.0, 2.0], [1.0, 4.0], [6.0, 1.0]),
        ],
    }


def test_paired_ratios_divide_round_by_round() -> None:
    assert plots.paired_ratios([1.0, 2.0, 4.0], [0.5, 2.0, 3.0]) == [0.5, 1.0, 0.75]
    with pytest.raises(ValueError, match="rounds differ: 2 against 3"):
        plots.paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])


def test_moe_layer_panels_pair_each_round_and_carry_the_targets() -> None:
    dense, loop = plots.moe_layer_panels(_moe_payload())
    assert (dense.target, loop.target) == (0.8, 3.0)
    first, second = "E=64 k=8\nT=4096", "E=64 k=8\nT=16384"
    # speed of mtl over dense in round r: dense_s[r] / mtl_s[r]
    assert dense.groups[first]["dense"] == [0.5, 1.0, 1.0]
    assert dense.groups[second]["dense"] == [0.5, 2.0]
    assert loop.groups[first]["loop"] == [2.0, 1.0, 2.0]
    assert loop.groups[second]["loop"] == [3.0, 0.5]
    (gpu_dense, gpu_loop) = plots.moe_layer_panels(_moe_payload("cuda:0"))
    assert gpu_dense.target == 0.75 and gpu_loop.target is None  # no loop target on GPU


def test_moe_layer_other_variants_share_one_panel() -> None:
    payload = _moe_payload()
    for p in payload["points"]:
        n = len(p["variants"]["mtl"]["times_s"])
        p["variants"]["hf_eager"] = {"times_s": [4.0] * n}
    panels = plots.moe_layer_panels(payload)
    assert [p.title for p in panels] == ["mtl vs dense", "mtl vs loop", "mtl vs the other variants"]
    assert panels[2].groups["E=64 k=8\nT=4096"]["hf_eager"] == [4.0, 2.0, 1.0]


def _rec_payload() -> dict:
    # seeds of different speed: pairing across seeds would give other ratios
    return {
        "points": [
            {
                "dataset": "census",
                "results": [
                    {
                        "impl": "mtl",
                        "epoch_times_by_seed": [[1.0, 2.0], [10.0, 20.0]],
                        "test_auc": {"income": 0.95},
                        "test_auc_by_seed": [{"income": 0.96}, {"income": 0.94}],
                    },
                    {
                        "impl": "rechub",
                        "epoch_times_by_seed": [[5.0, 8.0], [30.0, 100.0]],
                        "test_auc": {"income": 0.945},
                        "test_auc_by_seed": [{"income": 0.94}, {"income": 0.95}],
                    },
                ],
            }
        ]
    }


def test_rec_train_panels_pair_epochs_within_each_seed() -> None:
    speed, auc = plots.rec_train_panels(_rec_payload())
    assert speed.target == 4.0
    assert speed.groups == {"census": {"mtl": [5.0, 4.0, 3.0, 5.0]}}
    diffs = auc.groups["census\nincome"]["mtl"]
    assert diffs == pytest.approx([0.015, -0.005])  # each seed minus rechub's mean
    assert auc.target == 0.0


def test_rec_train_panels_read_json_from_before_seeds() -> None:
    payload = _rec_payload()
    for row in payload["points"][0]["results"]:
        row["epoch_times_s"] = row.pop("epoch_times_by_seed")[0]
        del row["test_auc_by_seed"]
    speed, auc = plots.rec_train_panels(payload)
    assert speed.groups["census"]["mtl"] == [5.0, 4.0]
    assert auc.groups["census\nincome"]["mtl"] == pytest.approx([0.005])


def test_rec_train_panels_need_a_rechub_row() -> None:
    payload = _rec_payload()
    payload["points"][0]["results"].pop()
    with pytest.raises(ValueError, match="no rechub rows"):
        plots.rec_train_panels(payload)


def test_lm_train_panels_are_relative_to_dense() -> None:
    payload = {
        "results": [
            {"preset": "lm_dense", "step_times_s": [0.1, 0.2]},
            {"preset": "lm_mixtral", "step_times_s": [0.2, 0.25]},
        ]
    }
    (panel,) = plots.lm_train_panels(payload)
    assert panel.groups == {"mixtral": {"eager": [0.5, 0.8]}}
    payload["results"].pop(0)
    with pytest.raises(ValueError, match="no lm_dense row"):
        plots.lm_train_panels(payload)


def test_lm_train_compiled_rows_pair_with_compiled_dense_and_their_eager_twin() -> None:
    payload = {
        "results": [
            {"preset": "lm_dense", "step_times_s": [0.1, 0.2]},
            {"preset": "lm_mixtral", "step_times_s": [0.2, 0.25]},
            {"preset": "lm_dense", "compiled": True, "step_times_s": [0.05, 0.4]},
            {"preset": "lm_mixtral", "compiled": True, "step_times_s": [0.1, 0.4]},
        ]
    }
    presets, twins = plots.lm_train_panels(payload)
    # eager against eager dense; compiled against compiled dense: 0.05/0.1, 0.4/0.4
    assert presets.groups == {"mixtral": {"eager": [0.5, 0.8], "compiled": [0.5, 1.0]}}
    # each compiled model over its eager twin, step by step: 0.1/0.05, 0.2/0.4; 0.2/0.1, 0.25/0.4
    assert twins.groups == {
        "dense": {"compiled": [2.0, 0.5]},
        "mixtral": {"compiled": [2.0, 0.625]},
    }
    assert twins.target == 1.0


def test_unknown_json_is_named_in_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"other\.json: not the JSON of moe_layer\.py"):
        plots.plot_file(bad)


def test_drawn_dots_are_the_ratios_and_the_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection, PathCollection

    panels = plots.moe_layer_panels(_moe_payload())
    fig = plots.draw(panels, "t")
    try:
        ax_dense = fig.axes[0]
        dots = [c for c in ax_dense.collections if isinstance(c, PathCollection)]
        ys = sorted(float(y) for c in dots for _, y in c.get_offsets())
        assert ys == sorted([0.5, 1.0, 1.0, 0.5, 2.0])
        ticks = [c for c in ax_dense.collections if isinstance(c, LineCollection)]
        medians = sorted(float(seg[0][1]) for c in ticks for seg in c.get_segments())
        assert medians == [1.0, 1.25]  # median (not mean) of each shape's rounds
        assert any(
            line.get_linestyle() == "--" and line.get_ydata()[0] == 0.8
            for line in ax_dense.get_lines()
        )
    finally:
        plt.close(fig)
    path = tmp_path / "moe_layer.json"
    path.write_text(json.dumps(_moe_payload()))
    png = plots.plot_file(path)
    assert png == tmp_path / "moe_layer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_or_skip_says_why_it_drew_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "rec_train.json"
    payload = _rec_payload()
    payload["points"][0]["results"].pop()  # mtl alone: no rechub to pair with
    path.write_text(json.dumps(payload))
    plots.plot_or_skip(path)
    assert "plot skipped: rec_train JSON has no rechub rows" in capsys.readouterr().out
    assert not path.with_suffix(".png").exists()
    path.write_text(json.dumps(_rec_payload()))
    plots.plot_or_skip(path)
    assert f"wrote {path.with_suffix('.png')}" in capsys.readouterr().out


def test_cli_writes_into_the_given_directory(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "moe_layer.json"
    path.write_text(json.dumps(_moe_payload()))
    plots.main([str(path), "--dir", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / "moe_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "moe_layer.png").exists()


def test_a_series_missing_from_the_first_group_still_gets_a_legend_entry() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    payload = _moe_payload()
    for point in payload["points"]:
        n = len(point["variants"]["mtl"]["times_s"])
        point["variants"]["hf_grouped_mm"] = {"times_s": [1.0] * n}
    payload["points"][1]["variants"]["hf_eager"] = {"times_s": [1.0, 1.0]}  # second shape only
    panels = plots.moe_layer_panels(payload)
    fig = plots.draw(panels, "t")
    try:
        _, labels = fig.axes[2].get_legend_handles_labels()
        assert sorted(labels) == ["hf_eager", "hf_grouped_mm"]
    finally:
        plt.close(fig)
