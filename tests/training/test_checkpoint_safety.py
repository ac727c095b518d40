"""Loading a checkpoint runs no code named in it: no arbitrary ``_target_``, no pickled
callables; broken or foreign checkpoints give one line naming the file.

Each crafted file names a harmless callable that writes a marker file, so a test
fails (the marker exists) wherever loading would run it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mtl.data.spec import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.training.build import build, load_module
from mtl.training.config import conf_dir
from mtl.training.rec_module import RecModule
from mtl.training.safe_load import check_trusted_targets, is_trusted_target


def _net_config() -> dict[str, Any]:
    """A tiny ranker's net_config, shaped as :func:`mtl.training.build.build_net` stores it."""
    spec = FeatureSpec(
        categorical=[CategoricalFeature("item", 10, 4)],
        numeric=[NumericFeature("price", mean=0.0, std=1.0)],
        tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")],
    )
    embedding = {
        "_target_": "mtl.models.rec.embedding.FeatureEmbedding",
        "spec": {"_target_": "mtl.data.spec.FeatureSpec.from_dict", "data": spec.to_dict()},
    }
    model = {
        "_target_": "mtl.models.rec.MMoE",
        "num_experts": 2,
        "expert_hidden": [8],
        "d_in": 5,
        "tasks": spec.task_names,
    }
    return {"_target_": "mtl.models.rec.ranker.Ranker", "embedding": embedding, "model": model}


def _save_rec_checkpoint(path: Path, net_config: dict[str, Any] | None = None) -> RecModule:
    """A genuine RecModule checkpoint, written as Lightning writes one."""
    net_config = net_config or _net_config()
    module = RecModule(net=build(net_config, what="net"), net_config=net_config)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return module


def _crafted(path: Path, net_config: dict[str, Any]) -> Path:
    torch.save({"hyper_parameters": {"net_config": net_config}, "state_dict": {}}, path)
    return path


def _hostile_configs(marker: Path) -> dict[str, dict[str, Any]]:
    """Per target, a config that writes ``marker`` when built (what a crafted file could do)."""
    as_path = {"_target_": "pathlib.Path", "_args_": [str(marker)]}
    return {
        "builtins.open": {"_target_": "builtins.open", "_args_": [str(marker), "w"]},
        "pathlib.Path.touch": {"_target_": "pathlib.Path.touch", "_args_": [as_path]},
        "torch.save": {"_target_": "torch.save", "obj": {}, "f": str(marker)},
        # A function of the library, not a class: it writes where it is told.
        "mtl.training.results.write_json": {
            "_target_": "mtl.training.results.write_json",
            "path": as_path,
            "data": {},
        },
        # Hydra >= 1.3.8 blocks these two itself; earlier 1.3 releases run them.
        "builtins.exec": {
            "_target_": "builtins.exec",
            "_args_": [f"open({str(marker)!r}, 'w').write('ran')"],
        },
        # Starts with "mtl." but resolves to os.system through mtl.cli's own import.
        "mtl.cli.os.system": {
            "_target_": "mtl.cli.os.system",
            "_args_": [f"touch {shlex.quote(str(marker))}"],
        },
    }


HOSTILE = list(_hostile_configs(Path("x")))


@pytest.mark.parametrize("name", HOSTILE)
def test_load_module_refuses_targets_outside_the_library(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "evil.ckpt", _hostile_configs(marker)[name])
    with pytest.raises(ValueError, match=rf"{path}.*_target_ '{name}'.*not loaded"):
        load_module(path)
    assert not marker.exists()


def test_load_module_refuses_an_untrusted_target_nested_in_a_ranker(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    config = _net_config()
    config["model"]["gate"] = _hostile_configs(marker)["builtins.open"]
    path = _crafted(tmp_path / "evil.ckpt", config)
    with pytest.raises(ValueError, match=r"'builtins.open' at model.gate._target_"):
        load_module(path)
    assert not marker.exists()


class _RunsOnUnpickle:
    """Pickles as a call of ``exec``: unpickling without ``weights_only`` runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_load_module_reads_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "pickled.ckpt"
    torch.save({"hyper_parameters": {"net_config": _RunsOnUnpickle(marker)}}, path)
    with pytest.raises(ValueError, match=rf"{path} cannot be read with weights_only=True"):
        load_module(path)
    assert not marker.exists()


def test_load_module_still_rebuilds_a_genuine_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "good.ckpt"
    saved = _save_rec_checkpoint(path)
    module = load_module(path)
    assert isinstance(module, RecModule)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, msg=key)


def test_load_module_names_the_file_on_a_state_dict_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    _save_rec_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    # The weights of another model under this checkpoint's net_config.
    key = next(k for k in checkpoint["state_dict"] if k.startswith("net.model."))
    checkpoint["state_dict"][key] = torch.zeros(3, 3, 3)
    del checkpoint["state_dict"][next(reversed(checkpoint["state_dict"]))]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} does not match the network") as err:
        load_module(path)
    assert "\n" not in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_load_module_names_an_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint {path}"):
        load_module(path)


def test_targets_of_the_shipped_model_configs_are_trusted() -> None:
    for file in sorted((conf_dir() / "model").glob("*.yaml")):
        check_trusted_targets(yaml.safe_load(file.read_text()), source=str(file))
    check_trusted_targets(_net_config(), source="build_net")


def test_trust_follows_the_object_not_the_name() -> None:
    assert is_trusted_target("mtl.models.lm.MoEFFN")
    assert is_trusted_target("mtl.data.spec.FeatureSpec.from_dict")
    assert not is_trusted_target("mtl.training.build.instantiate")  # hydra's, imported
    assert not is_trusted_target("mtl.training.build.torch.load")
    assert not is_trusted_target("mtl.models.rec.MMoE.load_state_dict")  # torch's method
    assert not is_trusted_target("mtl.no_such_module.Thing")
    assert not is_trusted_target("torch.optim.Adam")
    assert is_trusted_target("torch.optim.Adam", extra={"torch.optim.Adam"})
