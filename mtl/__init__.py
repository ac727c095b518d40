"""mtl: multi-task learning with mixtures of experts.

One expert/gate abstraction (:mod:`mtl.moe`) serves multi-task recommenders
(:mod:`mtl.models.rec`: MMoE, PLE, HoME, ...) and sparse-MoE language models
(:mod:`mtl.models.lm`).
"""

__version__ = "0.1.0"
