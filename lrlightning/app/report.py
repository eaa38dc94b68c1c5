"""``summary.json``, the record of a run: its fields (``summarize``), its table in the log (``summary_table``) and
the run's outputs, the factorized model then the summary, written last and atomically (``write_outputs``)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Trainer
from torch import nn

from ..counting import count_macs, count_params
from ..speed.cpu import features_text
from ..export import save_factorized
from ..plan import Plan
from ..budget import Allocation
from ..rules import Budget, Latency, rule_label, rule_record
from ..speed.measure import measured_speedup
from ..speed.timing import Spread
from ..training.summary import format_table
from .deploy import deploy_table
from .provenance import provenance

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
METHOD = "lowrank_projection"  # the method's name in summaries
FACTORIZED = "factorized.pt"


def allocation_facts(allocation: Allocation | None) -> dict[str, Any]:
    """What a budget's allocation went by: ``budget_errors`` (``"weight"``, or ``"output"`` errors on data) and
    ``budget_objective`` (``"max"`` or ``"sum"``), and
    for latency what it found when it was made: ``budget_check`` (the allocated model's speedup measured against
    dense, see ``lrlightning.speed.speedup_check``) and ``latency_table`` (where its timings came from); empty without
    a budget."""
    if allocation is None:
        return {}
    facts = {"budget_errors": allocation.errors, "budget_objective": allocation.objective}
    if allocation.check is None:
        return facts
    return {**facts, "budget_check": allocation.check.as_dict(), "latency_table": allocation.table}


def training_facts(trainer: Trainer, seconds: float) -> dict[str, Any]:
    """Epochs, steps, training time (s), last training loss and whether it diverged (non-finite)."""
    loss = trainer.callback_metrics.get("train/loss")
    loss = None if loss is None else float(loss)
    return {"epochs": trainer.current_epoch, "global_step": trainer.global_step, "train_seconds": round(seconds, 1),
            "train_loss": loss, "diverged": loss is not None and not math.isfinite(loss)}


def summarize(method: str, plan: Plan | None, dense: nn.Module, small: nn.Module, input_shape: tuple[int, ...],
              latency_batch_sizes: Sequence[int], metrics: dict, extra: dict) -> dict[str, Any]:
    """The fields of ``summary.json`` (``extra`` last): ``plan`` (None for a dense run) holds the options and the
    factorized layers of ``dense``, whose factorized copy is ``small``; ``metrics`` come from ``run_test`` and ``val_accuracy``. Latency: dense and
    factorized timed interleaved in their serving form (``lrlightning.speed.serving``: BatchNorm folded, the budget's
    ``Latency.memory_format``, default channels_last) at each of ``latency_batch_sizes``, on the CPU, or on the
    budget's ``Latency.device``: medians over the rounds, the speedup as the median of per-round ratios with its
    interquartile range (``speedup_low``, ``speedup_high``) and whether that range excludes 1.0
    (``speedup_distinguishable``), at the first batch size (``latency_batch_size``); with several,
    ``latency_by_batch`` holds them all ({batch size: {latency_ms_dense, latency_ms_factorized, speedup, ...}})."""
    device, memory_format = "cpu", Latency.memory_format
    options, plans = (plan.options, list(plan.layers)) if plan is not None else (None, [])
    rule = options.rank if options is not None else None
    if isinstance(rule, Budget) and rule.metric == "latency":
        device, memory_format = rule.latency.device or "cpu", rule.latency.memory_format
    by_batch = {size: latency_fields(measured_speedup(dense, small, input_shape, size, device, memory_format))
                for size in latency_batch_sizes}
    first = by_batch[latency_batch_sizes[0]]
    weights_dense = sum(p.params_dense for p in plans)
    weights_factorized = sum(p.params_factorized for p in plans)
    params_dense, params_factorized = count_params(dense), count_params(small)
    macs_dense, macs_factorized = count_macs(dense, input_shape), count_macs(small, input_shape)
    return {
        "method": method,
        "scheme": options.scheme.name if options else None,
        "scheme_options": options.scheme.options() if options else None,
        "rule": rule_record(rule) if options else None,
        "layers_compressed": len(plans),
        "params_dense": params_dense,
        "params_factorized": params_factorized,
        "macs_dense": macs_dense,
        "macs_factorized": macs_factorized,
        "compression_ratio": weights_dense / weights_factorized if plans else 1.0,
        "model_compression_ratio": params_dense / params_factorized,
        "mac_reduction": macs_dense / macs_factorized,
        "val_acc_factorized": metrics.get("val_acc_factorized"),
        "test_acc_projected": metrics.get("acc_projected"),
        "test_acc_factorized": metrics.get("acc_factorized"),
        "max_abs_logit_diff": metrics.get("max_abs_logit_diff"),
        **{f"test_{k}": v for k, v in metrics.items() if k in ("acc_dense", "acc_decomposed")},
        **first,
        "latency_batch_size": latency_batch_sizes[0],
        **({"latency_by_batch": {str(size): fields for size, fields in by_batch.items()}} if len(by_batch) > 1 else {}),
        "latency_device": str(device),
        "latency_threads": torch.get_num_threads(),
        "latency_memory_format": memory_format,
        "objective": (("activation" if options.weighted else "weight") if options is not None else None),
        "ranks": {p.name: list(p.rank) if isinstance(p.rank, tuple) else p.rank for p in plans},
        **provenance(),
        **extra,
    }


def latency_fields(measured: tuple[Spread, Spread, Spread]) -> dict[str, Any]:
    """A summary's latency fields from ``measured_speedup``'s (dense ms, factorized ms, speedup)."""
    dense, factorized, speedup = measured
    return {"latency_ms_dense": dense.median, "latency_ms_factorized": factorized.median, "speedup": speedup.median,
            "speedup_low": speedup.low, "speedup_high": speedup.high, "speedup_rounds": speedup.rounds,
            "speedup_distinguishable": speedup.excludes(1.0)}


def speedup_text(s: dict[str, Any]) -> str:
    """The measured speedup with its interquartile range, and a note when it is not distinguishable from 1.0."""
    speedup = s.get("speedup") or s["latency_ms_dense"] / s["latency_ms_factorized"]
    if s.get("speedup_low") is None:
        return f"{speedup:.2f}x"
    text = f"{speedup:.2f}x (IQR {s['speedup_low']:.2f}-{s['speedup_high']:.2f})"
    return text if s.get("speedup_distinguishable") else text + ", not distinguishable from 1.0"


def summary_table(s: dict[str, Any]) -> str:
    """A summary as a headline and a dense-vs-factorized table: parameters, MACs, CPU latency, test accuracy."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f} %"

    dense_acc = s["test_acc_projected"] if s["test_acc_projected"] is not None else s.get("test_acc_dense")
    device = s.get("latency_device", "cpu").upper()
    by_batch = s.get("latency_by_batch") or {str(s["latency_batch_size"]): s}
    rows = [
        ["parameters", f"{s['params_dense']:,}", f"{s['params_factorized']:,}", f"{s['model_compression_ratio']:.2f}x"],
        ["MACs per image", f"{s['macs_dense']:,}", f"{s['macs_factorized']:,}", f"{s['mac_reduction']:.2f}x"],
        *([f"{device} latency, batch {size}", f"{b['latency_ms_dense']:.1f} ms", f"{b['latency_ms_factorized']:.1f} ms",
           speedup_text(b)] for size, b in by_batch.items()),
        ["test accuracy", pct(dense_acc), pct(s["test_acc_factorized"]), ""],
    ]
    head = f"{s['method']}: no low-rank layers"
    if s["scheme"] is not None:
        head = (f"{s['method']}: {s['scheme']} {rule_label(s['rule'])} on {s['layers_compressed']} layers, "
                f"{s['compression_ratio']:.2f}x smaller over those layers")
    if s["scheme"] is not None and s["max_abs_logit_diff"] is not None:
        head += f"; max |logit diff| dense vs factorized {s['max_abs_logit_diff']:.1e}"
    if s.get("test_acc_decomposed") is not None:
        head += f"; {pct(s['test_acc_decomposed'])} right after decomposition"
    check = s.get("budget_check")
    if check is not None:
        measured = check["measured"]
        verdict = ("short: out of reach on this CPU, the fastest allocation kept" if check["verdict"] == "short"
                   else check["verdict"])
        where = f" at batch {check['batch_size']}, the slowest" if check.get("batch_size") is not None else ""
        head += (f"\nlatency budget {check['budget']:g}x, when fit started: {verdict} "
                 f"(measured {measured['median']:.2f}x{where}, IQR {measured['low']:.2f}-{measured['high']:.2f})")
    dense_label = "dense (projected)" if s["test_acc_projected"] is not None else "dense"
    table = head + "\n" + format_table(["", dense_label, "factorized", "ratio"], rows)
    machine = s.get("machine")
    if isinstance(machine, dict) and machine.get("cpu") and str(s.get("latency_device", "cpu")).startswith("cpu"):
        features = features_text(machine.get("cpu_features") or [])
        table += (f"\nlatency timed on {machine['cpu']} ({features}), {s.get('latency_threads')} threads, "
                  f"{s.get('latency_memory_format', 'contiguous')}, BatchNorm folded")
    if isinstance(s.get("deploy"), dict) and "rows" in s["deploy"]:
        table += "\n" + deploy_table(s["deploy"])
    return table


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def write_outputs(run_dir: Path, small: nn.Module, spec: dict | None, summary: dict,
                  deployed: Callable[[], dict | None] | None = None) -> dict:
    """Factorized model (weights + structure spec), then ``summary.json``; then, when ``deployed`` is given, its
    entry (``lrlightning.app.deploy``) added to ``summary.json`` under ``deploy``. ``finished`` is false in a
    summary written before its deploy step has ended (a run killed there reads as unfinished), true after. Logs
    the summary table. A deploy
    step that fails leaves ``factorized.pt`` and ``summary.json`` written, records its error under ``deploy`` and
    raises."""
    summary["factorized"] = FACTORIZED
    save_factorized(small, run_dir / FACTORIZED, backbone=spec, metadata=summary)
    summary["finished"] = deployed is None
    write_json(run_dir / SUMMARY, summary)
    if deployed is not None:
        try:
            entry = deployed()
        except Exception as error:
            summary["deploy"] = {"error": f"{type(error).__name__}: {error}"}
            summary["finished"] = True
            write_json(run_dir / SUMMARY, summary)
            log.error("deploy failed; %s and %s are written without it", FACTORIZED, SUMMARY)
            raise
        if entry is not None:
            summary["deploy"] = entry
        summary["finished"] = True
        write_json(run_dir / SUMMARY, summary)
    log.info("summary (%s)\n%s", run_dir / SUMMARY, summary_table(summary))
    return summary
