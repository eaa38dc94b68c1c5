"""Which weight layers of a model run faster in int8, measured: each weight layer (Conv, Gemm, MatMul with a stored
weight) is cut out of the ONNX graph alone, with its input's shape, and timed in ONNX Runtime in float and in int8
as it runs between other int8 layers (``Int8Config``'s settings; 8-bit activations in and out, the fused kernel ONNX
Runtime makes of the QDQ form), paired and interleaved, at each batch size served. Timings are cached in the ONNX Runtime latency table of this CPU (``lrlightning.speed.latency``: keyed
by the CPU, its instruction sets, the thread count and ONNX Runtime's version; checked for staleness before cached
timings are used). Needs the ``onnx`` extra."""
from __future__ import annotations

import copy
import functools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..speed.latency import LatencyTable
from ..speed.timing import Spread
from .int8_config import Int8Config
from .qdq import quantize_qdq

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIBRATION_BATCH = 2  # random inputs calibrating a layer cut out for timing (values do not change its speed)


@dataclass(frozen=True)
class LayerPrecision:
    """One weight layer's int8 timing: the ONNX ``node`` name and, by batch size, ``ratios`` of its int8 time to
    its float time (paired per round: below 1, int8 runs faster); empty when it could not be timed alone (an input
    shape shape inference cannot give)."""

    node: str
    ratios: dict[int, Spread]

    @property
    def ratio(self) -> float | None:
        """The geometric mean over the batch sizes of the median ratios; None when not timed."""
        if not self.ratios:
            return None
        return math.exp(sum(math.log(spread.median) for spread in self.ratios.values()) / len(self.ratios))

    @property
    def faster(self) -> bool:
        """Whether int8 is the faster form (a layer that could not be timed counts as faster: the quantizer's own
        default)."""
        return self.ratio is None or self.ratio < 1.0

    def text(self) -> str:
        """``"int8 / float time 1.31x at batch 1, 1.12x at batch 32"``."""
        if not self.ratios:
            return "not timed (input shape unknown)"
        return "int8 / float time " + ", ".join(f"{spread.median:.2f}x at batch {batch}"
                                                for batch, spread in self.ratios.items())


def weight_nodes(model) -> list:
    """The nodes of an ONNX ``model`` whose weight (second input) is stored in the graph."""
    stored = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in stored]


def shapes_at_batch_one(model) -> dict[str, list[int]]:
    """Every tensor's shape in ``model`` with its inputs' first (batch) dimension set to 1 (ONNX shape inference);
    a tensor with an unknown dimension is left out."""
    import onnx

    fixed = copy.deepcopy(model)
    for graph_input in fixed.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(dim.HasField("dim_value") for dim in dims):
            shapes[info.name] = [dim.dim_value for dim in dims]
    return shapes


def layer_alone(model, node, shapes: dict[str, list[int]]):
    """``node`` of ``model`` as a model of its own (its stored inputs kept, a free batch dimension ``N``), or None
    when its input or output shape is unknown."""
    from onnx import TensorProto, helper

    source, target = node.input[0], node.output[0]
    if source not in shapes or target not in shapes:
        return None
    stored = {init.name: init for init in model.graph.initializer}
    inputs = [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["N", *shapes[source][1:]])]
    outputs = [helper.make_tensor_value_info(target, TensorProto.FLOAT, ["N", *shapes[target][1:]])]
    single = copy.deepcopy(node)
    del single.output[1:]
    graph = helper.make_graph([single], "layer", inputs, outputs, [stored[name] for name in node.input[1:]
                                                                   if name in stored])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def int8_core(model):
    """A quantized single-layer QDQ ``model`` (``layer_alone`` through ``quantize_qdq``) as it runs inside an int8
    chain: the QuantizeLinear of its input and the DequantizeLinear of its output removed, so it takes and returns
    8-bit activations; the model as it is when the quantizer left that form out."""
    from onnx import helper

    graph = model.graph
    source, target = graph.input[0], graph.output[0]
    enter = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == source.name]
    leave = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == target.name]
    if len(enter) != 1 or len(leave) != 1 or sum(source.name in n.input for n in graph.node) != 1:
        return model
    stored = {init.name: init.data_type for init in graph.initializer}
    kind = stored.get(enter[0].input[2]) if len(enter[0].input) > 2 else None
    if kind is None:
        return model
    core = copy.deepcopy(model)
    graph = core.graph
    shapes = [[dim.dim_param or dim.dim_value for dim in info.type.tensor_type.shape.dim]
              for info in (source, target)]
    inputs = [helper.make_tensor_value_info(enter[0].output[0], kind, shapes[0])]
    outputs = [helper.make_tensor_value_info(leave[0].input[0], kind, shapes[1])]
    kept = [n for n in graph.node if n.name not in (enter[0].name, leave[0].name)]
    del graph.node[:], graph.input[:], graph.output[:]
    graph.node.extend(kept)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    return core


class OwnInput:
    """A session timed on an 8-bit input of its own (random, of the shape of the batch it is called with), since
    the int8 core of a layer takes 8-bit activations where the float layer takes floats."""

    def __init__(self, inference_session):
        self.session = inference_session
        self.input = inference_session.get_inputs()[0]
        self.array = None

    def __call__(self, x: torch.Tensor):
        if self.array is None or self.array.shape != tuple(x.shape):
            dtype = np.uint8 if self.input.type == "tensor(uint8)" else np.int8
            info = np.iinfo(dtype)
            self.array = np.random.default_rng(0).integers(info.min, info.max, tuple(x.shape), dtype=dtype)
        return self.session.run(None, {self.input.name: self.array})[0]

    def eval(self) -> "OwnInput":
        return self


def int8_runnable(module, example: torch.Tensor, config: Int8Config, in_chain: bool = True):
    """``module`` (eval mode) in int8 as ONNX Runtime runs it on batches shaped like ``example``: exported for
    timing (``lrlightning.deploy.onnx.timing_bytes``), quantized as the resolved ``config`` says (calibrated on
    ``example``), called like a module. ``in_chain``: as it runs between other int8 layers (``int8_core``, 8-bit in
    and out, timed on an input of its own); else whole, float in and out."""
    import onnx

    from .onnx import timing_bytes

    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "m.onnx", Path(folder) / "m.int8.onnx"
        fp32.write_bytes(timing_bytes(module.eval(), example))
        quantize_qdq(fp32, int8, [example], config, prepare=True)
        model = onnx.load(str(int8))
    return int8_timed(model, in_chain)


def int8_timed(model, in_chain: bool = True):
    """A quantized ONNX ``model`` called like a module: with ``in_chain``, its ``int8_core`` on an 8-bit input of
    its own (``OwnInput``) where it has one; else whole, on the float input it is called with."""
    from .onnx import SessionModule, session

    core = int8_core(model) if in_chain else model
    if core is not model:
        return OwnInput(session(core.SerializeToString()))
    return SessionModule(session(model.SerializeToString()))


def layer_key(node, shapes: dict[str, list[int]], stored: dict[str, list[int]], batch_size: int) -> str:
    """A layer's cache key: its op, weight and bias shapes, attributes and input (N, C, *size)."""
    from onnx import helper

    attributes = ",".join(f"{a.name}={helper.get_attribute_value(a)}" for a in sorted(node.attribute,
                                                                                      key=lambda a: a.name))
    weights = "x".join(str(stored[name]) for name in node.input[1:] if name in stored)
    return f"onnx {node.op_type} {weights} {attributes} input={(batch_size, *shapes[node.input[0]][1:])}".replace(
        " ", "")


def int8_label(config: Int8Config) -> str:
    """The cache label of a layer's int8 form under a resolved ``config``."""
    return (f"int8 {config.weight_range} {config.activations} {'per-channel' if config.per_channel else 'per-tensor'}"
            " in-chain")


def measure_precision(model, config: Int8Config, batch_sizes: Sequence[int]) -> tuple[list[LayerPrecision], dict]:
    """(each weight layer's ``LayerPrecision``, the facts of the timing tables by batch size) for an ONNX
    ``model`` (pre-processed as the quantizer takes it), quantized as the resolved ``config`` says, at each of
    ``batch_sizes``; cached in ``config.cache`` (``remeasure`` times cached layers anew)."""
    import onnx

    from ..deploy.onnx import SessionModule, session

    shapes = shapes_at_batch_one(model)
    stored = {init.name: list(init.dims) for init in model.graph.initializer}
    label = int8_label(config)
    layers: dict[str, dict[int, Spread]] = {}
    facts = {}
    with tempfile.TemporaryDirectory() as folder:
        built = {}
        for node in weight_nodes(model):
            alone = layer_alone(model, node, shapes)
            layers[node.name] = {}
            if alone is None:
                continue
            fp32 = Path(folder) / f"{len(built)}.onnx"
            fp32.write_bytes(alone.SerializeToString())
            int8 = fp32.with_suffix(".int8.onnx")
            input_shape = shapes[node.input[0]][1:]
            built[node.name] = (node, input_shape, fp32, int8)

        def runner(path: Path, int8: Path | None = None, input_shape=()):
            @functools.cache  # one session per form of a layer, whatever the batch size
            def build():
                if int8 is None:
                    return SessionModule(session(path))
                quantize_qdq(path, int8, [torch.randn(CALIBRATION_BATCH, *input_shape)], config)
                return int8_timed(onnx.load(str(int8)))
            return lambda example: build()

        largest = [max(built, key=lambda name: math.prod(built[name][1]) * math.prod(
            stored[built[name][0].input[1]]))] if built else []  # re-timed when checking a cached table
        for batch_size in batch_sizes:
            table = LatencyTable("cpu", batch_size, config.cache, config.remeasure, backend="onnxruntime")
            requests = {name: (layer_key(node, shapes, stored, batch_size),
                               lambda shape=input_shape: torch.randn(batch_size, *shape),
                               runner(fp32), {label: runner(fp32, int8, input_shape)})
                        for name, (node, input_shape, fp32, int8) in built.items()}
            table.check_pairs([requests[name] for name in largest])
            for name, request in requests.items():
                layers[name][batch_size] = table.pair_times(*request).ratios[label]
            facts[batch_size] = table.facts()
    return [LayerPrecision(name, ratios) for name, ratios in layers.items()], facts
