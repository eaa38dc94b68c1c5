"""ONNX Runtime's static quantization as this package runs it: QDQ format, int8 weights, activations of the type
and weights of the range an ``Int8Config`` (resolved) names, ranges calibrated by min-max on input batches. Needs
the ``onnx`` extra."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .int8_config import Int8Config


class Batches:
    """ONNX Runtime's calibration reader over torch batches (the first element of tuples is the input)."""

    def __init__(self, input_name: str, batches: Iterable):
        self.input_name = input_name
        self.batches = iter(batches)
        self.count = 0

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.count += 1
        return {self.input_name: torch.as_tensor(x).detach().cpu().float().numpy()}


@contextlib.contextmanager
def quiet_quantizer():
    """Silence the quantizer's warnings (it logs them on the root logger) while the block runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def pre_process(source: str | Path, out: str | Path) -> None:
    """ONNX Runtime's pre-processing of the ONNX file ``source`` into ``out`` (shape inference, graph optimization:
    BatchNorm folded into the convs), the quantizer's warnings silenced."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_quantizer():
        quant_pre_process(str(source), str(out))


def quantize_qdq(source: str | Path, out: str | Path, batches: Iterable, config: Int8Config,
                 exclude: Sequence[str] = (), prepare: bool = False) -> int:
    """Quantize the ONNX file ``source`` into ``out`` as ``config`` says (its ``weight_range`` and
    ``activations`` resolved, not ``"auto"``), calibrated on ``batches`` (inputs of the graph's first input),
    leaving the nodes named in ``exclude`` in float; the number of calibration batches read. ``prepare`` runs ONNX
    Runtime's pre-processing first (shape inference, graph optimization: BatchNorm folded into the convs), for a
    graph that has not been through it. The quantizer's warnings (on the root logger) are silenced while it runs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if "auto" in (config.weight_range, config.activations):
        raise ValueError(f"quantize_qdq needs a resolved Int8Config (Int8Config.resolved()), got {config!r}")

    class Reader(Batches, CalibrationDataReader):
        pass

    if prepare:
        prepared = Path(out).with_name(f".{Path(out).name}.prepared.onnx")
        try:
            pre_process(source, prepared)
            return quantize_qdq(prepared, out, batches, config, exclude)
        finally:
            prepared.unlink(missing_ok=True)
    reader = Reader(onnx.load(str(source), load_external_data=False).graph.input[0].name, batches)
    activation = QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8
    with quiet_quantizer():
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                        reduce_range=config.weight_range == "reduced", activation_type=activation,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
    return reader.count
