"""What a projection keeps best: the weight (``"weight"``, the default everywhere) or the layer's outputs on
data (``Activation``). Pure Python."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .rules import is_int, is_number

WEIGHT = "weight"


@dataclass(frozen=True)
class Activation:
    """Keep each layer's output error E‖(W − W_r)x‖² small over its inputs x on data: under their covariance when a
    BatchNorm normalizes the output, else their second moment (``lrlightning.schemes.weighting``).

    ``batches``: training batches the callback gathers the input statistics from before each projection (default
    2; ``factorize``/``project_`` take theirs from ``calibration``). ``observe_training``: the callback records them
    on the training step's own forward passes of the optimizer steps that end at the projection (the last
    ceil(batches / accumulate_grad_batches) steps), with no extra pass (default True); where those passes do not
    run a planned layer (or the module is compiled) and with False, it runs ``batches`` passes of its own. ``ridge``: added to each metric, times its mean
    eigenvalue (default 1e-2). ``bn_weighting``: also scale each output channel by the following BatchNorm's |γ|/σ
    (default False). The projected weight lies in the same rank set as under ``"weight"``, so export stays exact.
    """

    batches: int = 2
    ridge: float = 1e-2
    bn_weighting: bool = False
    observe_training: bool = True

    def __post_init__(self):
        if not (is_int(self.batches) and self.batches >= 1):
            raise ValueError(f"`Activation.batches` must be an int >= 1, got {self.batches!r}")
        if not (is_number(self.ridge) and self.ridge > 0):
            raise ValueError(f"`Activation.ridge` must be a number > 0 (a fraction of the mean eigenvalue), "
                             f"got {self.ridge!r}")
        for argument in ("bn_weighting", "observe_training"):
            if not isinstance(getattr(self, argument), bool):
                raise ValueError(f"`Activation.{argument}` must be a bool, got {getattr(self, argument)!r}")


Objective = str | Activation


def objective_of(value: Any) -> Objective:
    """``"weight"``, or an ``Activation`` (from itself, ``"activation"`` or a mapping of its fields)."""
    if value == WEIGHT or isinstance(value, Activation):
        return value
    if value == "activation":
        return Activation()
    if isinstance(value, Mapping):
        return Activation(**value)
    raise ValueError(f"`objective` must be 'weight', 'activation' or Activation(batches=..., ridge=..., "
                     f"bn_weighting=..., observe_training=...), got {value!r}")
