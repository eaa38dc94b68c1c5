"""Plain-text tables of a low-rank plan: what is compressed, at which rank, for how many parameters."""
from __future__ import annotations

import torch

from ..budget import Allocation
from ..speed.cpu import cpu_label
from ..plan import LayerPlan, SkippedLayer


TABLE_STATES = {"measured": "timed now", "cached": "cached, confirmed by re-timing", "stale": "the cached table was "
                "stale: timed again", "remeasured": "timed again, as `Latency.remeasure` asks"}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cost_text(value: float, metric: str) -> str:
    if metric == "latency":
        return f"{value:.3f}"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value:,.0f}"


def plan_table(plans: list[LayerPlan], skipped: list[SkippedLayer], scheme: str,
               allocation: Allocation | None = None) -> str:
    """Selected layers with shape (and ``g<groups>`` for grouped convs), rank, dense and factorized weight params; skipped layers with the reason;
    totals and the compression ratio over the compressed layers (the paper's definition). With a budget's
    ``allocation``, each layer's dense → allocated cost in the budget's metric, and the whole model's."""
    header = ["layer", "scheme", "shape", "rank", "dense", "factorized", "ratio"]
    rows = [[p.name, p.scheme, "x".join(map(str, p.shape)) + (f" g{p.groups}" if p.groups > 1 else ""), str(p.rank), f"{p.params_dense:,}",
             f"{p.params_factorized:,}", f"{p.compression:.2f}x"] for p in plans]
    dense = sum(p.params_dense for p in plans)
    factorized = sum(p.params_factorized for p in plans)
    rows.append(["total", scheme, "", "", f"{dense:,}", f"{factorized:,}", f"{dense / max(factorized, 1):.2f}x"])
    if allocation is not None:
        unit = "ms" if allocation.metric == "latency" else allocation.metric
        header.append(f"{unit} dense -> allocated")
        for row, plan in zip(rows, plans):
            before, after = allocation.costs[plan.name]
            row.append(f"{cost_text(before, allocation.metric)} -> {cost_text(after, allocation.metric)}")
        rows[-1].append("")
    text = "Low-rank plan\n" + format_table(header, rows)
    if allocation is not None:
        runtime = " in ONNX Runtime" if (allocation.table or {}).get("backend") == "onnxruntime" else ""
        where = (f" at batch {allocation.batch_size} on {allocation.device}{runtime}, predicted from measured layer "
                 f"times ({TABLE_STATES[allocation.table['state']]})" if allocation.metric == "latency" else "")
        text += (f"\nBudget {allocation.budget:g}x in {allocation.unit}{where}: whole model "
                 f"{cost_text(allocation.dense, allocation.metric)} -> {cost_text(allocation.allocated, allocation.metric)}"
                 f" ({allocation.achieved:.2f}x)")
        for size, (before, after) in list(allocation.predicted.items())[1:]:
            text += f"; at batch {size}: {cost_text(before, 'latency')} -> {cost_text(after, 'latency')} " \
                    f"({before / after:.2f}x)"
        if allocation.check is not None:
            text += f"\nSpeedup of the allocated model: {allocation.check.text()}"
        if allocation.metric == "latency" and str(allocation.device).startswith("cpu"):
            memory_format = (allocation.table or {}).get("memory_format")
            text += (f"\nTimed on {cpu_label()}, {torch.get_num_threads()} threads"
                     f"{f', {memory_format}' if memory_format else ''}")
    if skipped:
        text += "\nLeft dense:\n" + "\n".join(f"  {s.name}: {s.reason}" for s in skipped)
    return text


def projection_metrics(plans: list[LayerPlan], stats: list, seconds: float) -> dict[str, float]:
    """What the callback logs for one projection (``lowrank/``): mean ``rel_error``, ``energy`` and (with input
    statistics) ``output_rel_error`` over ``stats`` (``LayerStats``), ``compression`` of ``plans`` and ``seconds``."""
    metrics = {
        "lowrank/rel_error": sum(s.rel_error for s in stats) / len(stats),
        "lowrank/energy": sum(s.energy for s in stats) / len(stats),
        "lowrank/compression": sum(p.params_dense for p in plans) / sum(p.params_factorized for p in plans),
        "lowrank/seconds": seconds,
    }
    outputs = [s.output_rel_error for s in stats if s.output_rel_error is not None]
    if outputs:
        metrics["lowrank/output_rel_error"] = sum(outputs) / len(outputs)
    return metrics
