"""Multi-task ranking models: shared-bottom, OMoE, MMoE, PLE, ESMM and HoME.

Every model takes the already-embedded input ``x (B, d_in)`` and returns a
:class:`MultiTaskOutput`; build one by name with :func:`build_model`.
"""

from mtl.models.rec.esmm import ESMM
from mtl.models.rec.home import HoME, check_task_groups
from mtl.models.rec.mmoe import MMoE
from mtl.models.rec.omoe import OMoE
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.ple import PLE
from mtl.models.rec.registry import MODELS, build_model, build_model_from_config, model_class
from mtl.models.rec.shared_bottom import SharedBottom
from mtl.models.rec.towers import TaskTowers, Tower, make_mlp

__all__ = [
    "ESMM",
    "MODELS",
    "PLE",
    "HoME",
    "MMoE",
    "MultiTaskOutput",
    "OMoE",
    "SharedBottom",
    "TaskTowers",
    "Tower",
    "build_model",
    "build_model_from_config",
    "check_task_groups",
    "make_mlp",
    "model_class",
]
