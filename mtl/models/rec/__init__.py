"""Multi-task ranking models: shared-bottom, OMoE, MMoE, PLE, ESMM, HoME and task-routed MoE.

Every model takes the already-embedded input ``x (B, d_in)`` and returns a
:class:`MultiTaskOutput`; a :class:`Ranker` puts the feature embedding in front.
Configs name them by class (``_target_: mtl.models.rec.MMoE`` in ``conf/model/``).
"""

from mtl.models.rec.esmm import ESMM
from mtl.models.rec.home import HoME, check_task_groups
from mtl.models.rec.mmoe import MMoE
from mtl.models.rec.omoe import OMoE
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.ple import PLE
from mtl.models.rec.ranker import Ranker
from mtl.models.rec.shared_bottom import SharedBottom
from mtl.models.rec.task_routed import TaskRoutedMoE
from mtl.models.rec.towers import TaskTowers, Tower, make_mlp

__all__ = [
    "ESMM",
    "PLE",
    "HoME",
    "MMoE",
    "MultiTaskOutput",
    "OMoE",
    "Ranker",
    "SharedBottom",
    "TaskRoutedMoE",
    "TaskTowers",
    "Tower",
    "check_task_groups",
    "make_mlp",
]
