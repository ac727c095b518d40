"""The examples in mtl.moe's docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import mtl.moe

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(mtl.moe.__path__, prefix="mtl.moe.") if not m.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn}, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
