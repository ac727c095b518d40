"""Auxiliary-loss weights must be finite and >= 0, in the MoE layer and in the rankers alike."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mtl.cli import main
from mtl.models.rec import PLE, MMoE
from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
from mtl.moe.losses import check_aux_loss_weights

BAD = [(-1.0, r"-1\.0"), (-1e-9, r"-1e-09"), (math.nan, "nan"), (math.inf, "inf")]


def _layer(weights: dict[str, float]) -> MoELayer:
    return MoELayer(
        gate=TopKGate(d_model=8, num_experts=4, k=2),
        experts=SwiGLUExperts(num_experts=4, d_model=8, d_hidden=8),
        dispatch=DroplessDispatch(),
        aux_loss_weights=weights,
    )


@pytest.mark.parametrize(("w", "shown"), BAD)
def test_layer_refuses_a_bad_weight_naming_key_and_value(w: float, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"aux_loss_weights\.load_balance={shown}"):
        _layer({"z_loss": 1e-3, "load_balance": w})


@pytest.mark.parametrize("cls", [MMoE, PLE], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("w", "shown"), BAD)
def test_rankers_refuse_a_bad_weight_naming_key_and_value(cls: type, w: float, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"aux_loss_weights\.importance={shown}"):
        cls(d_in=4, tasks=["click"], aux_loss_weights={"importance": w})


def test_zero_and_positive_weights_pass_as_floats() -> None:
    assert _layer({"load_balance": 0, "z_loss": 2}).aux_loss_weights == {
        "load_balance": 0.0,
        "z_loss": 2.0,
    }
    assert check_aux_loss_weights({"entropy": "0.5"}) == {"entropy": 0.5}
    with pytest.raises(
        ValueError, match=r"aux_loss_weights\.entropy='x': a weight must be a number"
    ):
        check_aux_loss_weights({"entropy": "x"})


def test_cli_refuses_a_negative_lm_weight_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "train",
        "experiment=lm_mixtral",
        "model.moe.aux_loss_weights.load_balance=-1",
        f"output_dir={out}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "aux_loss_weights.load_balance=-1.0" in err and "\n" not in err, err
