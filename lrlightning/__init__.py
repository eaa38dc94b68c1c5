"""lrlightning: train CNNs to be exactly low-rank with a Lightning callback, then factorize them."""

from .callback import LowRankProjection, NonFiniteTrainingError
from .counting import count_macs, count_params
from .export import factorize, factorize_planned, load_factorized, save_factorized
from .finish import finish, finish_
from .options import LowRankOptions
from .plan import LayerPlan, plan_layers, relative_plans, relative_ranks
from .projection import LayerStats, NonFiniteWeightError, project_
from .schemes import SCHEME_NAMES

__version__ = "0.1.0"

__all__ = [
    "LayerPlan",
    "LayerStats",
    "LowRankOptions",
    "LowRankProjection",
    "NonFiniteTrainingError",
    "NonFiniteWeightError",
    "SCHEME_NAMES",
    "count_macs",
    "count_params",
    "factorize",
    "factorize_planned",
    "finish",
    "finish_",
    "load_factorized",
    "plan_layers",
    "project_",
    "relative_plans",
    "relative_ranks",
    "save_factorized",
]
