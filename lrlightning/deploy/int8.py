"""int8 ONNX models: ONNX Runtime's static quantization of an exported model (QDQ format, int8 weights per output
channel, uint8 activations with ranges calibrated on real batches), and which of its weight layers (Conv, Gemm,
MatMul) were quantized and which were left in float. Needs the ``onnx`` extra.

Choices measured on an AVX2 CPU without VNNI: uint8 activations (int8 ones ran 1.4-2x slower than fp32); 7-bit
weights (``reduce_range``), since the u8 × s8 kernels saturate pairs of full-range products there (a Tucker-2
ResNet-20 fell from 80.6 % to 21 % without it, and ran slower); convs with fewer than ``min_channels`` output
channels or products per output left in float (thin factor stages gain nothing from int8 kernels and pay for requantizing)."""
from __future__ import annotations

import ast
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .onnx import require_onnx

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8File:
    """A quantized model: ``path``, ``size_bytes``, ``calibration_batches`` used, and the weight layers by name
    (the PyTorch module each node came from, as the exporter recorded it; a conv with its BatchNorm folded in
    carries the BatchNorm's name) that were ``quantized`` or left in ``float``."""

    path: str
    size_bytes: int
    calibration_batches: int
    quantized: tuple[str, ...]
    float: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"path": self.path, "size_bytes": self.size_bytes, "calibration_batches": self.calibration_batches,
                "quantized": list(self.quantized), "float": list(self.float)}


def layer_name(node) -> str:
    """The PyTorch module an ONNX node came from (the dynamo exporter's ``name_scopes`` metadata), else its name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 2:
                return scopes[-2]
    return node.name


def weight_layers(model) -> tuple[list[str], list[str]]:
    """(quantized, float) names of the weight layers of an ONNX ``model``: quantized when the weight input comes
    from a DequantizeLinear node."""
    producers = {output: node for node in model.graph.node for output in node.output}
    quantized, left = [], []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            producer = producers.get(node.input[1])
            (quantized if producer is not None and producer.op_type == "DequantizeLinear" else left).append(
                layer_name(node))
    return quantized, left


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


def thin_convs(model, min_channels: int) -> list[str]:
    """Names of the Conv nodes of an ONNX ``model`` with fewer than ``min_channels`` output channels or products
    summed per output (input channels per group × kernel positions): a thin factor stage, not a 3-channel stem."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    thin = []
    for node in model.graph.node:
        shape = shapes.get(node.input[1], ()) if node.op_type == "Conv" else ()
        if len(shape) >= 2 and min(shape[0], math.prod(shape[1:])) < min_channels:
            thin.append(node.name)
    return thin


MIN_CHANNELS = 16  # convs thinner than this stay in float (``thin_convs``)


def quantize_int8(fp32: str | Path, out: str | Path, calibration: Iterable, per_channel: bool = True,
                  reduce_range: bool = True, min_channels: int = MIN_CHANNELS) -> Int8File:
    """Write ``fp32`` (an ONNX file, ``export_onnx``) to ``out`` quantized to int8: ONNX Runtime's pre-processing
    (shape inference, graph optimization), then static QDQ quantization, int8 weights (per output channel when
    ``per_channel``, default; 7-bit when ``reduce_range``, default) and uint8 activations whose ranges come from
    running ``calibration`` (an iterable of input batches or (input, target) batches; at least one) through the
    model (min-max). Convs with fewer than ``min_channels`` (default ``MIN_CHANNELS``; 1: none) output channels or products per
    output (``thin_convs``) stay in float."""
    require_onnx("quantize_int8")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(Batches, CalibrationDataReader):
        pass

    if not (isinstance(min_channels, int) and min_channels >= 1):
        raise ValueError(f"`min_channels` must be an int >= 1, got {min_channels!r}")
    batches = list(calibration)
    if not batches:
        raise ValueError("`calibration` must yield at least one batch of inputs, got none")
    fp32, out = Path(fp32), Path(out)
    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    reader = Reader(input_name, batches)
    quant_log = logging.getLogger()  # the quantizer warns on the root logger
    level = quant_log.level
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_log.setLevel(logging.ERROR)
        try:
            quant_pre_process(str(fp32), str(prepared))
            thin = thin_convs(onnx.load(str(prepared)), min_channels)
            quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=thin)
        finally:
            quant_log.setLevel(level)
    quantized, left = weight_layers(onnx.load(str(out)))
    return Int8File(str(out), out.stat().st_size, reader.count, tuple(quantized), tuple(left))
