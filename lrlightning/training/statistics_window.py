"""Input statistics recorded on the training step's own forward passes, kept over the last optimizer steps before
a projection (``Activation.observe_training``). Pure torch."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..activations import InputRecorder, LayerStatistics
from ..names import COMPILED_SEGMENT
from ..options import LowRankOptions
from ..plan import LayerPlan
from ..projection import weights_channels

Reduce = Callable[[dict[str, LayerStatistics]], dict[str, LayerStatistics]]  # sums statistics over processes


class StatisticsWindow:
    """``{optimizer step: {layer name: LayerStatistics}}`` of the last ``steps`` optimizer steps, each summing the
    passes of that step's batches (``steps`` = ceil(objective batches / batches per optimizer step))."""

    def __init__(self, entries: dict[int, dict[str, LayerStatistics]] | None = None):
        self.entries = dict(entries or {})
        self.steps = 1
        self.recorder: InputRecorder | None = None
        self.generator: torch.Generator | None = None

    def start(self, model: nn.Module, plans: list[LayerPlan], options: LowRankOptions,
              batches_per_step: int = 1) -> None:
        """Hooks on the planned layers of ``model`` for the steps before projections; none when the objective does
        not observe training or the module is compiled (hooks would not see its layers run)."""
        self.recorder = None
        compiled = any(COMPILED_SEGMENT in name.split(".") for name, _ in model.named_modules())
        if not options.objective.observe_training or compiled:
            return
        channels = {p.name for p in plans if weights_channels(p, options)}
        device = next(model.parameters()).device
        self.generator = torch.Generator(device)
        self.recorder = InputRecorder(model, [p.name for p in plans], channels, self.generator)
        self.steps = math.ceil(options.objective.batches / batches_per_step)

    def open(self, upcoming: int, due: Callable[[int], bool]) -> None:
        """Record the coming batch's passes when a projection is ``due`` within the window after it (``upcoming``:
        the optimizer step the batch counts towards; its first batch seeds the im2col row draws)."""
        if self.recorder is None:
            return
        if any(due(step) for step in range(upcoming, upcoming + self.steps)):
            if not self.recorder.sums:
                self.generator.manual_seed(upcoming)
            self.recorder.attach()

    def close(self, step: int, stepped: bool, reduce: Reduce) -> None:
        """End the batch's recording; when the batch ended optimizer step ``step`` (``stepped``), keep what that
        step's passes recorded (``reduce``: summed over processes) and forget steps outside the window."""
        if self.recorder is None:
            return
        self.recorder.detach()
        if not stepped:
            return
        if self.recorder.sums:
            self.entries[step] = reduce(self.recorder.result())
            self.recorder.reset()
        self.entries = {taken: recorded for taken, recorded in self.entries.items() if taken > step - self.steps}

    def statistics(self, step: int, plans: list[LayerPlan], objective: Any,
                   warn: Callable[[str], Any]) -> dict[str, LayerStatistics] | None:
        """The statistics of the window ending at ``step``, summed, or None (separate passes take over; ``warn``
        names the layers) when a planned layer is missing or a step was not recorded (resumed inside the window, or
        the projection was not foreseen)."""
        if self.recorder is None:
            return None
        steps = [taken for taken in range(step - self.steps + 1, step + 1) if taken > 0]
        if any(taken not in self.entries for taken in steps):
            return None
        entries = [self.entries[taken] for taken in steps]
        missing = [p.name for p in plans if not all(p.name in entry for entry in entries)]
        if missing:
            warn(f"`objective`={objective}: the training step's forward passes do not run {missing}; their input "
                 "statistics come from separate passes instead.")
            return None
        device = next(self.recorder.model.parameters()).device
        summed = {}
        for plan in plans:
            layers = [entry[plan.name].to(device) for entry in entries]
            summed[plan.name] = sum(layers[1:], layers[0])
        return summed

    def detach(self) -> None:
        if self.recorder is not None:
            self.recorder.detach()

    def state(self) -> dict[int, dict[str, list]]:
        """The entries as host tensors (a checkpoint's ``statistics_window``)."""
        return {step: {name: [*(t.cpu() for t in layer.tensors()),
                              layer.output_scale.cpu() if layer.output_scale is not None else None]
                       for name, layer in recorded.items()} for step, recorded in self.entries.items()}

    @staticmethod
    def entries_of(state: dict | None) -> dict[int, dict[str, LayerStatistics]]:
        """The entries a checkpoint's ``statistics_window`` holds."""
        return {step: {name: LayerStatistics(*layer) for name, layer in recorded.items()}
                for step, recorded in (state or {}).items()}
