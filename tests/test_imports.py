"""The model packages import with torch alone.

A GPU machine may have torch but not Hydra, polars or Lightning; the CUDA checks
(``tests/test_cuda.py``, ``benchmarks/moe_layer.py``) rely on this.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("polars", "omegaconf", "hydra", "pytorch_lightning", "lightning", "torchmetrics")
"""Not on the device tool's GPU machines (and not needed by the models)."""


def test_models_and_their_feature_spec_import_without_hydra_polars_or_lightning() -> None:
    code = (
        "import sys; import mtl.moe, mtl.models.lm, mtl.models.rec, mtl.data.spec; "
        "import mtl.models.rec.embedding; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
