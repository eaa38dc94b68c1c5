"""A model as an ONNX file that ships: ``export_onnx`` writes it with a dynamic batch dimension and BatchNorm folded
into the convs before it (the exporter's graph optimizer), then runs it in ONNX Runtime and checks its outputs
against PyTorch's before returning. A model the exporter cannot take is an ``OnnxExportError`` naming the smallest
submodule that fails on its own. Needs the ``onnx`` extra (``require_onnx`` names what is missing)."""
from __future__ import annotations

import copy
import importlib
import io
import logging
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..names import named_modules

EXTRA = ("onnx", "onnxscript", "onnxruntime")  # the modules of the ``onnx`` extra
INPUT, OUTPUT = "input", "output"  # the graph's input and output names
KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)  # node metadata kept in the file: the module each node came from
EXPORTER_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")  # silenced while exporting (progress lines)
CHECK_TOLERANCE = 1e-4  # of the largest |output|: how far ONNX Runtime's outputs may be from PyTorch's


class OnnxExportError(RuntimeError):
    """The exporter failed on a model; ``layer`` names the smallest submodule that fails on its own ("" when the
    whole model fails but no submodule does)."""

    def __init__(self, message: str, layer: str = ""):
        super().__init__(message)
        self.layer = layer


def require_onnx(what: str) -> None:
    """Raise an ImportError naming the ``onnx`` extra and its missing modules, if any, before ``what`` runs."""
    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{what} needs the `onnx` extra, which is not installed (missing: {', '.join(missing)}): "
                          "pip install 'lrlightning[onnx]'")


@dataclass(frozen=True)
class OnnxFile:
    """An exported model: ``path``, ``size_bytes``, ``max_abs_diff`` (ONNX Runtime vs PyTorch outputs on the check
    batches), ``batch_sizes`` checked (two: the batch dimension is dynamic) and ``batchnorm_left`` (BatchNormalization
    nodes the exporter could not fold into a conv)."""

    path: str
    size_bytes: int
    max_abs_diff: float
    batch_sizes: tuple[int, int]
    batchnorm_left: int

    def as_dict(self) -> dict:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}


def quiet_export(module: nn.Module, example: torch.Tensor, dynamic: bool):
    """The ``torch.onnx`` program of ``module`` on ``example`` (dynamo exporter, eval mode as given; the batch
    dimension dynamic when ``dynamic``), with the exporter's progress lines and warnings silenced."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            return torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=[INPUT],
                                     output_names=[OUTPUT], dynamic_shapes=shapes)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def timing_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` (eval mode) as ONNX bytes for timing at ``example``'s shape: the TorchScript exporter where torch
    still has it (tens of ms for one layer, against about a second for the dynamo exporter), else the dynamo one."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=[INPUT], output_names=[OUTPUT])
        return buffer.getvalue()
    except (TypeError, RuntimeError, NotImplementedError):
        return quiet_export(module, example, dynamic=False).model_proto.SerializeToString()


def failing_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, Exception | None]:
    """(name, error) of the smallest submodule of ``model`` that the exporter fails on, alone on the input it gets
    in ``model``'s forward pass: from the top, the first failing child is followed down until none of its children
    fails. ("", None) when no submodule called on one tensor fails."""
    inputs: dict[str, torch.Tensor] = {}
    modules = named_modules(model)

    def keep(name):
        def hook(module, args):
            if name not in inputs and len(args) == 1 and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()
        return hook

    handles = [module.register_forward_pre_hook(keep(name)) for name, module in modules.items() if name]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    found, error, parent = "", None, model
    prefix = ""
    while True:
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if name not in inputs:
                continue
            try:
                quiet_export(child, inputs[name], dynamic=False)
            except Exception as failure:  # noqa: BLE001 - any exporter failure locates the layer
                found, error, parent, prefix = name, failure, child, f"{name}."
                break
        else:
            return found, error


def first_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, terminal colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of ``model`` (a path or serialized bytes) with ``threads`` intra-op threads
    (default: torch's count), one inter-op thread, all graph optimizations, and threads that do not spin-wait
    after a run (on a shared CPU, spinning threads slow down whatever runs next)."""
    import onnxruntime

    settings = onnxruntime.SessionOptions()
    settings.intra_op_num_threads = threads or torch.get_num_threads()
    settings.inter_op_num_threads = 1
    settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    settings.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, settings, providers=["CPUExecutionProvider"])


class SessionModule:
    """An ONNX Runtime session called like a module: ``runner(x)`` on a CPU tensor returns the first output as a
    numpy array (what ``lrlightning.speed.timing`` times and ``lrlightning.app.deploy`` evaluates)."""

    def __init__(self, inference_session):
        self.session = inference_session
        self.input = inference_session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        return self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]

    def eval(self) -> "SessionModule":  # timed like a module in eval mode
        return self


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                tolerance: float = CHECK_TOLERANCE) -> OnnxFile:
    """Write ``model`` (an eval-mode copy on the CPU) to ``path`` as ONNX: dynamic batch, BatchNorm folded, input
    ``"input"``, output ``"output"``, each node naming the module it came from (``KEPT_METADATA``). ``example`` is a batch (N, C, *size) of real inputs; the file is checked in
    ONNX Runtime on it and on a batch of another size: its outputs must lie within ``tolerance`` × the largest
    |output| of PyTorch's, else an ``OnnxExportError`` (the file is removed). An exporter failure is an
    ``OnnxExportError`` naming the failing layer (``failing_layer``)."""
    require_onnx("export_onnx")
    import onnx

    if not (isinstance(example, torch.Tensor) and example.dim() >= 2 and example.shape[0] >= 1):
        raise ValueError(f"`example` must be a batch of inputs (N, C, *size) with N >= 1, got "
                         f"{getattr(example, 'shape', example)!r}")
    module = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu()
    examples = (example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example,)
    examples += (examples[0][:-1] if examples[0].shape[0] > 2 else examples[0].repeat(2, *[1] * (example.dim() - 1)),)
    try:
        program = quiet_export(module, examples[0], dynamic=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the layer named
        layer, cause = failing_layer(module, examples[0])
        where = (f"layer {layer!r} ({type(named_modules(module)[layer]).__name__}) fails on its own: "
                 f"{first_line(cause)}") if layer else first_line(error)
        raise OnnxExportError(f"ONNX cannot export {type(model).__name__}: {where}", layer) from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debugging records (stack traces, FX nodes) are dropped
        kept = [(prop.key, prop.value) for prop in node.metadata_props if prop.key in KEPT_METADATA]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    batchnorm_left = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    runner = SessionModule(session(path))
    worst = 0.0
    with torch.no_grad():
        for batch in examples:
            expected = module(batch)
            got = torch.from_numpy(runner(batch))
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
            worst = max(worst, diff)
            if not diff <= tolerance * max(expected.abs().max().item(), 1.0):
                path.unlink(missing_ok=True)
                raise OnnxExportError(f"the ONNX export of {type(model).__name__} does not match PyTorch at batch "
                                      f"{batch.shape[0]}: max |output diff| {diff:.3g} (output shape "
                                      f"{tuple(got.shape)} vs {tuple(expected.shape)}); allowed {tolerance:g} × the "
                                      "largest |output|")
    return OnnxFile(str(path), path.stat().st_size, worst, (examples[0].shape[0], examples[1].shape[0]),
                    batchnorm_left)
