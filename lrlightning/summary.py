"""Plain-text tables of a low-rank plan: what is compressed, at which rank, for how many parameters."""
from __future__ import annotations

from .plan import LayerPlan, SkippedLayer


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_table(plans: list[LayerPlan], skipped: list[SkippedLayer], scheme: str) -> str:
    """Selected layers with shape, rank, dense and factorized weight params; skipped layers with the reason;
    totals and the compression ratio over the compressed layers (the paper's definition)."""
    rows = [[p.name, p.scheme, "x".join(map(str, p.shape)), str(p.rank), f"{p.params_dense:,}",
             f"{p.params_factorized:,}", f"{p.compression:.2f}x"] for p in plans]
    dense = sum(p.params_dense for p in plans)
    factorized = sum(p.params_factorized for p in plans)
    rows.append(["total", scheme, "", "", f"{dense:,}", f"{factorized:,}", f"{dense / max(factorized, 1):.2f}x"])
    text = "Low-rank plan\n" + format_table(["layer", "scheme", "shape", "rank", "dense", "factorized", "ratio"], rows)
    if skipped:
        text += "\nLeft dense:\n" + "\n".join(f"  {s.name}: {s.reason}" for s in skipped)
    return text
