"""lrlightning: train CNNs to be exactly low-rank with a Lightning callback, then factorize them.

The callback is imported on first use, so that ``factorize``, ``save_factorized`` and ``load_factorized`` load
torch only (Lightning pulls in torchmetrics, which imports matplotlib whenever it is installed)."""

from typing import TYPE_CHECKING

from .counting import count_macs, count_params
from .deploy.int8_config import Int8Config
from .training.distillation import Distillation, distillation_loss, frozen_teacher
from .export import factorize, factorize_planned, load_factorized, save_factorized
from .finish import finish, finish_
from .objectives import Activation
from .options import LowRankOptions, Selection, Solver
from .plan import LayerPlan, Plan, make_plan, plan_layers, relative_plans, relative_ranks
from .projection import LayerStats, NonFiniteWeightError, gather_statistics, project_
from .rules import Budget, Compression, Energy, Latency
from .schemes import SCHEME_NAMES, LoweredSVD, SpatialSVD, TiledSVD, Tucker2, register

if TYPE_CHECKING:
    from .training.callback import LowRankProjection, NonFiniteTrainingError

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Budget",
    "Latency",
    "Compression",
    "Distillation",
    "Energy",
    "Int8Config",
    "LoweredSVD",
    "Selection",
    "Solver",
    "SpatialSVD",
    "TiledSVD",
    "Tucker2",
    "register",
    "LayerPlan",
    "Plan",
    "LayerStats",
    "LowRankOptions",
    "LowRankProjection",
    "NonFiniteTrainingError",
    "NonFiniteWeightError",
    "SCHEME_NAMES",
    "count_macs",
    "count_params",
    "distillation_loss",
    "factorize",
    "factorize_planned",
    "finish",
    "finish_",
    "frozen_teacher",
    "gather_statistics",
    "load_factorized",
    "make_plan",
    "plan_layers",
    "project_",
    "relative_plans",
    "relative_ranks",
    "save_factorized",
]

_CALLBACK_NAMES = ("LowRankProjection", "NonFiniteTrainingError")


def __getattr__(name: str):
    if name in _CALLBACK_NAMES:
        from .training import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lrlightning' has no attribute {name!r}")
