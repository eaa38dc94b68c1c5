"""The run's last step, ``deploy=onnx|int8``: the dense and the factorized model as ONNX files (``dense.onnx``,
``factorized.onnx``; with ``int8`` also ``dense.int8.onnx`` and ``factorized.int8.onnx``, calibrated on training
batches, quantized as the ``deploy.int8`` node says, an ``Int8Config``), each tested on the test set and timed in
ONNX Runtime on the CPU, interleaved, at the job's largest ``latency_batch_sizes`` and at batch 1.
``summary.json`` records them under ``deploy``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..deploy.int8 import quantize_int8
from ..deploy.int8_config import Int8Config
from ..deploy.onnx import SessionModule, export_onnx, require_onnx, session
from ..training.recalibration import reshuffled
from ..rules import is_int
from ..speed.timing import Spread, interleaved_samples, paired_ratios
from ..training.summary import format_table

log = logging.getLogger(__name__)

FORMATS = ("none", "onnx", "int8")
DEPLOY_ROUNDS = 7  # interleaved rounds of the deployed models' timings
EXAMPLE_BATCH = 8  # real inputs an export is checked on


DEPLOY_KEYS = ("format", "calibration_batches", "int8")


def deploy_settings(node: DictConfig | dict | None) -> tuple[str, int, Int8Config]:
    """(format, calibration batches, ``Int8Config``) of a ``deploy`` node; raises a ValueError naming a bad key."""
    node = dict(node or {})
    if "min_channels" in node:
        raise ValueError(f"`deploy.min_channels` ({node['min_channels']!r}) is no longer a setting: each layer runs "
                         "in int8 only where it measured faster (`deploy.int8.layers: measured`); use "
                         "`deploy.int8.layers=all` to quantize every layer, or `deploy.int8.float_layers=[...]` to keep "
                         "named modules in float")
    fmt = node.get("format", "none")
    if fmt not in FORMATS:
        raise ValueError(f"`deploy.format` must be one of {FORMATS}, got {fmt!r}")
    batches = node.get("calibration_batches", 8)
    if not (is_int(batches) and batches >= 1):
        raise ValueError(f"`deploy.calibration_batches` must be an int >= 1, got {batches!r}")
    unknown = sorted(set(node) - set(DEPLOY_KEYS))
    if unknown:
        raise ValueError(f"`deploy` has unknown keys {unknown}; allowed: {', '.join(DEPLOY_KEYS)}")
    int8 = node.get("int8")
    if isinstance(int8, DictConfig):
        int8 = OmegaConf.to_container(int8, resolve=True)
    return fmt, int(batches), Int8Config.of(int8, "deploy.int8")


def check_deploy(node: DictConfig | dict | None) -> None:
    """Before a job runs: its ``deploy`` settings are valid and, for ``onnx`` or ``int8``, the ``onnx`` extra is
    installed (an ImportError naming it otherwise)."""
    fmt = deploy_settings(node)[0]
    if fmt != "none":
        require_onnx(f"deploy={fmt}")


def ort_accuracy(runner: SessionModule, loader) -> float:
    """Top-1 accuracy of ``runner`` over the (input, target) batches of ``loader``."""
    right = total = 0
    for x, y in loader:
        predicted = torch.from_numpy(runner(x)).argmax(1)
        right += int((predicted == y).sum())
        total += len(y)
    return right / max(total, 1)


def deployed_latency(runners: dict[str, SessionModule], input_shape: tuple[int, ...], batch_size: int,
                     reference: str) -> tuple[dict[str, Spread], dict[str, Spread]]:
    """({label: ms per batch}, {label: speedup against ``reference``, per round}) of the sessions timed
    interleaved on a random batch of ``batch_size`` inputs of ``input_shape``."""
    example = torch.randn(batch_size, *input_shape)
    samples = interleaved_samples(list(runners.values()), example, DEPLOY_ROUNDS, 0.02, 3 * DEPLOY_ROUNDS)
    by_label = dict(zip(runners, samples))
    return ({label: Spread.of(times) for label, times in by_label.items()},
            {label: paired_ratios(by_label[reference], times) for label, times in by_label.items()})


def deploy(node: DictConfig | dict | None, run_dir: Path, dense: nn.Module, small: nn.Module | None, datamodule,
           input_shape: tuple[int, ...], batch_size: int, seed: int) -> dict[str, Any] | None:
    """Write and measure the ``deploy`` artifacts of ``dense`` and ``small`` (None: a dense run) into ``run_dir``;
    the ``summary.json`` entry, or None for ``format: none``. Calibration batches are drawn from the training set
    with ``seed``."""
    fmt, calibration_batches, int8_config = deploy_settings(node)
    if fmt == "none":
        return None
    require_onnx(f"deploy={fmt}")
    datamodule.setup("fit")
    example = next(iter(reshuffled(datamodule.train_dataloader(), 1, seed)))[0][:EXAMPLE_BATCH]
    models = {"dense": dense} if small is None else {"dense": dense, "factorized": small}
    files: dict[str, Any] = {}
    for name, model in models.items():
        files[f"{name}_fp32"] = export_onnx(model, example, run_dir / f"{name}.onnx")
    if fmt == "int8":
        calibration = [batch[0] for batch in reshuffled(datamodule.train_dataloader(), calibration_batches, seed)]
        for name in models:
            files[f"{name}_int8"] = quantize_int8(run_dir / f"{name}.onnx", run_dir / f"{name}.int8.onnx",
                                                  calibration, int8_config, (1, batch_size))
    runners = {label: SessionModule(session(file.path)) for label, file in files.items()}
    datamodule.setup("test")
    accuracy = {label: ort_accuracy(runner, datamodule.test_dataloader()) for label, runner in runners.items()}
    latency, speedup = deployed_latency(runners, input_shape, batch_size, "dense_fp32")
    latency1, speedup1 = deployed_latency(runners, input_shape, 1, "dense_fp32")
    import onnxruntime

    rows = {}
    for label, file in files.items():
        row = {"file": Path(file.path).name, "size_bytes": file.size_bytes,
               "latency_ms": latency[label].median, "latency_ms_batch1": latency1[label].median,
               "speedup": speedup[label].median, "speedup_low": speedup[label].low,
               "speedup_high": speedup[label].high, "speedup_batch1": speedup1[label].median,
               "test_acc": accuracy[label]}
        if label.endswith("_int8"):
            row.update(quantized_layers=len(file.quantized), float_layers=list(file.float), why_float=file.why_float)
        else:
            row.update(max_abs_diff=file.max_abs_diff, batchnorm_left=file.batchnorm_left)
        rows[label] = row
    entry = {"format": fmt, "runtime": f"onnxruntime {onnxruntime.__version__} CPU",
             "threads": torch.get_num_threads(), "latency_batch_size": batch_size, "rows": rows}
    if fmt == "int8":
        entry.update(calibration_batches=calibration_batches, int8=files["dense_int8"].settings,
                     int8_timing={name: files[f"{name}_int8"].timing for name in models})
        entry["int8_accuracy_cost"] = {name: accuracy[f"{name}_fp32"] - accuracy[f"{name}_int8"] for name in models}
    return entry


def deploy_table(entry: dict[str, Any]) -> str:
    """The ``deploy`` entry of a summary as a table: file, size, latency at the two batch sizes, speedup against
    dense fp32, test accuracy."""
    batch = entry["latency_batch_size"]
    rows = [[label.replace("_", " "), row["file"], f"{row['size_bytes'] / 1e6:.2f} MB", f"{row['latency_ms']:.2f} ms",
             f"{row['latency_ms_batch1']:.2f} ms", f"{row['speedup']:.2f}x / {row['speedup_batch1']:.2f}x",
             f"{100 * row['test_acc']:.2f} %"] for label, row in entry["rows"].items()]
    head = f"deployed ({entry['runtime']}, {entry['threads']} threads)"
    return head + "\n" + format_table(["", "file", "size", f"batch {batch}", "batch 1", "speedup", "test accuracy"],
                                      rows)

