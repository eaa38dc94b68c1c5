"""int8 ONNX models: ONNX Runtime's static quantization of an exported model (QDQ format, int8 weights per output
channel, activations with ranges calibrated on real batches), set for the CPU it runs on (``Int8Config``: 7-bit
weights where the CPU's u8 x s8 kernels can saturate, 8-bit where VNNI or AMX accumulate in 32 bits), each weight
layer (Conv, Gemm, MatMul) quantized only where its int8 form measured faster (``lrlightning.deploy.precision``),
and a record of which layers were quantized and why the others stayed in float. Needs the ``onnx`` extra."""
from __future__ import annotations

import ast
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..speed.cpu import int8_path
from .int8_config import Int8Config
from .onnx import require_onnx
from .precision import WEIGHT_OPS, measure_precision, weight_nodes
from .qdq import pre_process, quantize_qdq


@dataclass(frozen=True)
class Int8File:
    """A quantized model: ``path``, ``size_bytes``, ``calibration_batches`` used, the weight layers by name (the
    PyTorch module each node came from, as the exporter recorded it; a conv with its BatchNorm folded in carries the
    BatchNorm's name) that were ``quantized`` or left in ``float``, ``why_float`` (name: reason: measured slower,
    with its int8 / float time ratios, or kept by ``Int8Config.float_layers``), the resolved ``settings`` (the
    ``Int8Config`` fields, the CPU's int8 path and why) and ``timing`` (the per-layer timing tables' facts by
    batch size; empty with ``layers="all"``)."""

    path: str
    size_bytes: int
    calibration_batches: int
    quantized: tuple[str, ...]
    float: tuple[str, ...]
    why_float: dict[str, str]
    settings: dict[str, Any]
    timing: dict[int, dict]

    def as_dict(self) -> dict:
        return {**asdict(self), "quantized": list(self.quantized), "float": list(self.float),
                "timing": {str(batch): facts for batch, facts in self.timing.items()}}


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


def measured_float(model, names: dict[str, str], config: Int8Config, batch_sizes: Sequence[int]) -> tuple[
        dict[str, str], dict]:
    """({node name: why it stays in float}, timing facts) for the pre-processed ONNX ``model`` whose weight layers
    are ``names`` ({node name: module name}): the nodes of the modules in ``config.float_layers`` (a name that is no
    weight layer's is a ValueError listing those there are), and with ``layers="measured"`` those whose int8 form is
    not faster (``measure_precision``)."""
    unknown = sorted(set(config.float_layers) - set(names.values()))
    if unknown:
        raise ValueError(f"`Int8Config.float_layers` names {unknown}, which are not weight layers of the model; "
                         f"its weight layers: {sorted(set(names.values()))}")
    why = {node: "kept in float by Int8Config.float_layers" for node, name in names.items()
           if name in config.float_layers}
    facts: dict = {}
    if config.layers == "measured":
        measured, facts = measure_precision(model, config, batch_sizes)
        why.update({layer.node: f"measured slower in int8: {layer.text()}" for layer in measured
                    if not layer.faster and layer.node not in why})
    return why, facts


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if not (isinstance(batch_sizes, Sequence) and len(batch_sizes) >= 1 and all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in batch_sizes)):
        raise ValueError(f"`batch_sizes` must be one or more ints >= 1, such as (1, 32), got {batch_sizes!r}")
    return tuple(dict.fromkeys(batch_sizes))


def quantize_int8(fp32: str | Path, out: str | Path, calibration: Iterable,
                  config: Int8Config | Mapping[str, Any] | None = None,
                  batch_sizes: Sequence[int] = (1, 32)) -> Int8File:
    """Write ``fp32`` (an ONNX file, ``export_onnx``) to ``out`` quantized to int8 as ``config`` says (an
    ``Int8Config`` or a mapping of its fields; default ``Int8Config()``: settings chosen for this CPU, each layer
    quantized only where measured faster at ``batch_sizes``, default (1, 32), the batch sizes the model is served
    at): ONNX Runtime's pre-processing (shape inference, graph optimization), then static QDQ quantization with
    activation ranges from running ``calibration`` (an iterable of input batches or (input, target) batches; at
    least one) through the model (min-max)."""
    require_onnx("quantize_int8")
    import onnx
    path = int8_path()
    config = Int8Config.of(config, "config")
    resolved = config.resolved(path)
    batch_sizes = check_batch_sizes(batch_sizes)
    batches = list(calibration)
    if not batches:
        raise ValueError("`calibration` must yield at least one batch of inputs, got none")
    fp32, out = Path(fp32), Path(out)
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        pre_process(fp32, prepared)
        model = onnx.load(str(prepared))
        names = {node.name: layer_name(node) for node in weight_nodes(model)}
        why, timing = measured_float(model, names, resolved, batch_sizes)
        count = quantize_qdq(prepared, out, batches, resolved, exclude=sorted(why))
    quantized, left = weight_layers(onnx.load(str(out)))
    settings = {**asdict(resolved), "float_layers": list(resolved.float_layers), "int8_path": path,
                "why": config.why(path), "batch_sizes": list(batch_sizes)}
    return Int8File(str(out), out.stat().st_size, count, tuple(quantized), tuple(left),
                    {names[node]: reason for node, reason in why.items()}, settings, timing)
