"""The conf/data recipes of the rec datasets instantiate RecDataModule with valid arguments."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.data.datamodule import RecDataModule
from mtl.training.config import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
REC_CONFIGS = [
    "synthetic_ctr",
    "synthetic_mmoe",
    "census_income",
    "kuairand",
]


@pytest.mark.parametrize("name", REC_CONFIGS)
def test_keys_are_datamodule_arguments(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == "mtl.data.datamodule.RecDataModule"
    params = set(inspect.signature(RecDataModule.__init__).parameters) - {"self"}
    keys = set(cfg.keys()) - {"_target_"}
    assert keys <= params, keys - params
    assert cfg.source == name
    assert cfg.batch_size >= 128 and "seed" in cfg
    assert abs(sum(cfg.split) - 1.0) < 1e-6


def test_synthetic_mmoe_config_instantiates() -> None:
    cfg = OmegaConf.load(CONF / "synthetic_mmoe.yaml")
    cfg.source_kwargs.n = 1200
    dm = instantiate(cfg)
    assert [len(dm.tensors(s)) for s in ("train", "val", "test")] == [1000, 100, 100]
    assert dm.spec.n_categorical == 0 and dm.spec.n_numeric == 100


def test_census_default_path_follows_env(
    census_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTL_SHARED_DATA", str(census_path.parents[1]))
    cfg = OmegaConf.load(CONF / "census_income.yaml")
    assert Path(cfg.path) == census_path
    cfg.source_kwargs.n_rows = 2000
    dm = instantiate(cfg)
    assert sum(len(dm.tensors(s)) for s in ("train", "val", "test")) == 2000
    assert dm.spec.task_names == ["income", "never_married"]


def test_missing_user_data_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    dm = instantiate(OmegaConf.load(CONF / "kuairand.yaml"))
    with pytest.raises(FileNotFoundError, match=f"KuaiRand path not found: {tmp_path}.*README"):
        dm.setup("fit")
    # The table presets name the key and the folder they expected.
    for name, folder in [("aliexpress", "aliexpress/AliExpress_NL"), ("ali_ccp", "ali_ccp")]:
        dm = instantiate(compose_config("train", [f"data={name}"]).data)
        expected = f"data.path: folder not found: {tmp_path / folder} "
        with pytest.raises(FileNotFoundError, match=expected):
            dm.setup("fit")
