"""The Mixture-of-Tokens config check names ``model.moe.group_size`` when it is below 1."""

from __future__ import annotations

import pytest

from mtl.training.config import ConfigError, compose_config
from mtl.training.config_checks import check_train_config


@pytest.mark.parametrize("group", [0, -2])
def test_group_size_below_one_names_the_key(group: int) -> None:
    cfg = compose_config("train", ["experiment=lm_mot", f"model.moe.group_size={group}"])
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg)
    assert str(info.value) == f"model.moe.group_size must be >= 1, got {group}"
