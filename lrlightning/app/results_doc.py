"""The results document (``docs/results.md``), generated from the result files under ``results/`` by
``lrl-collect --report results/ --out docs/results.md``. Two kinds of result files:

* a sweep: a folder holding ``sweep.json`` (``title``, ``section``, ``command``, optional ``notes``) and its run
  dirs with their ``summary.json`` (each with date, commit and machine); it is aggregated as ``lrl-collect`` does,
  and its Pareto plot is written as PNG into ``figures/`` beside the document;
* a table file: any other ``*.json`` with ``title``, ``section``, ``date``, ``commit``, ``machine``, ``command``,
  ``tables`` (each ``columns``, ``rows``, optional ``caption`` and ``lines``), optional ``source`` and ``notes``;
  the benchmark scripts write these, and tables recorded from earlier runs are kept in the same form.

Sections come in the order of ``SECTIONS``, entries in the order of their paths (named by date, they are in
the order they were made). The document holds nothing that the files
do not, so regenerating it from the same files gives the same bytes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .aggregate import aggregate, markdown_table, report
from .collect import collect_rows, plot
from .provenance import describe_machine

COMMAND = "lrl-collect --report results/ --out docs/results.md"
SECTIONS = {"accuracy": "Accuracy after compression", "overhead": "Training overhead of the callback",
            "projection": "Cost of one projection", "budget": "Global budget", "speed": "Speed of the factorized model",
            "deploy": "Deployed in ONNX Runtime: fp32 and int8", "data": "Data loading", "zoo": "Torchvision families: MACs and exactness of every layer kind"}
SWEEP = "sweep.json"
TABLE_KEYS = ("title", "section", "date", "commit", "machine", "command", "tables")
FIGURES = "figures"


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"result file {path} is not valid JSON: {error}") from None


def find_entries(results: Path) -> list[dict[str, Any]]:
    """Every sweep and table file under ``results``, each as its JSON plus ``path`` (relative, ``results/...``)
    and ``kind``; raises ValueError naming a table file that lacks a required key."""
    sweeps = sorted(p.parent for p in results.rglob(SWEEP))
    entries = []
    for sweep in sweeps:
        entries.append({**load(sweep / SWEEP), "kind": "sweep", "dir": sweep})
    for path in sorted(results.rglob("*.json")):
        if path.name in (SWEEP, "summary.json") or any(s in path.parents for s in sweeps):
            continue
        entry = load(path)
        missing = [key for key in TABLE_KEYS if key not in entry]
        if missing:
            raise ValueError(f"result file {path} lacks {missing}; a table file needs {list(TABLE_KEYS)}")
        entries.append({**entry, "kind": "tables", "dir": path})
    for entry in entries:
        entry["path"] = f"{results.name}/{entry['dir'].relative_to(results).as_posix()}"
    return entries


def sweep_provenance(rows: list[dict[str, Any]]) -> tuple[str, list[str], list[str]]:
    """Date range, distinct commits and distinct machines of a sweep's finished runs."""
    done = [row for row in rows if row.get("date")]
    dates = sorted(str(row["date"])[:10] for row in done)
    date = "unknown" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    commits = sorted({str(row.get("commit")) for row in done})
    machines = sorted({describe_machine(row.get("machine")) for row in done})
    return date, commits, machines


def provenance_lines(path: str, date: str, commits: list[str], machines: list[str], command: Any) -> list[str]:
    commands = command if isinstance(command, list) else [command]
    short = [c[:12] + ("-dirty" if c.endswith("-dirty") else "") for c in commits]
    lines = [f"- files: `{path}`", f"- date: {date}", "- commit: " + ", ".join(f"`{c}`" for c in short),
             "- machine: " + "; ".join(machines)]
    return lines + [f"- command: `{c}`" for c in commands]


def render_tables(entry: dict[str, Any]) -> list[str]:
    parts = []
    for table in entry["tables"]:
        if table.get("caption"):
            parts.append(table["caption"])
        parts.append(markdown_table(table["columns"], table["rows"]))
        if table.get("lines"):
            parts.append("\n".join(f"- {line}" for line in table["lines"]))
    return parts


def render(entry: dict[str, Any], figures: Path) -> str:
    """One entry as Markdown; a sweep's plot goes into ``figures``."""
    parts = [f"### {entry['title']}"]
    if entry["kind"] == "sweep":
        rows = collect_rows(entry["dir"])
        date, commits, machines = sweep_provenance(rows)
        parts.append("\n".join(provenance_lines(entry["path"], date, commits, machines, entry["command"])))
        parts.append(report(aggregate(rows)).rstrip("\n"))
        figure = figures / (entry["path"].replace("/", "_") + ".png")
        plot(rows, figure)
        parts.append(f"![accuracy vs compression of {entry['path']}]({figures.name}/{figure.name})")
    else:
        parts.append("\n".join(provenance_lines(entry["path"], str(entry["date"])[:10], [str(entry["commit"])],
                                                [describe_machine(entry["machine"])], entry["command"])))
        if entry.get("source"):
            parts.append(entry["source"])
        parts.extend(render_tables(entry))
    parts.extend(entry.get("notes") or [])
    return "\n\n".join(parts)


def section_order(entry: dict[str, Any]) -> tuple:
    section = entry["section"]
    rank = list(SECTIONS).index(section) if section in SECTIONS else len(SECTIONS)
    return (rank, section, entry["path"])


def document(results: Path, figures: Path) -> str:
    """The whole document; plots are written into ``figures``."""
    entries = sorted(find_entries(results), key=section_order)
    if not entries:
        raise ValueError(f"no result files under {str(results)!r} (sweep folders with {SWEEP}, or table JSON files)")
    figures.mkdir(parents=True, exist_ok=True)
    parts = ["# Results",
             f"Generated by `{COMMAND}` from the result files under `results/`: edit or add those, then run the "
             "command; a test checks that this file matches them. Every entry names its files, date, commit, "
             "machine and command. Accuracies are of the factorized model, in %."]
    section = None
    for entry in entries:
        if entry["section"] != section:
            section = entry["section"]
            parts.append(f"## {SECTIONS.get(section, section)}")
        parts.append(render(entry, figures))
    return "\n\n".join(parts) + "\n"


def write_document(results: Path, out: Path) -> None:
    """``document(results)`` into ``out``, plots into ``figures/`` beside it."""
    if not results.is_dir():
        raise ValueError(f"RESULTS_DIR must be a directory, got {str(results)!r}")
    text = document(results, out.parent / FIGURES)
    out.write_text(text)
