"""Where and when a result was made: the date, the git commit of the code, and the machine. Every result file
(``summary.json``, the benchmark JSON under ``results/``) carries these three fields; ``write_result`` writes a
benchmark's table file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..speed.cpu import cpu_record
from ..training.summary import format_table

CHECKOUT = Path(__file__).resolve().parent.parent


def git_commit(checkout: Path = CHECKOUT) -> str | None:
    """HEAD of the git checkout holding this package, with ``-dirty`` when tracked files differ from it; None when
    the package is not in a git checkout (an installed wheel) or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """Host name, CPU model and its speed flags (``lrlightning.speed.cpu.cpu_record``), CPU count, torch's intra-op thread
    count, GPU name (None without CUDA), versions (ONNX Runtime's where installed)."""
    return {"hostname": socket.gethostname(), **cpu_record(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": str(torch.__version__), "onnxruntime": onnxruntime_version(), "python": platform.python_version()}


def onnxruntime_version() -> str | None:
    """ONNX Runtime's version, None where it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("onnxruntime")
    except PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """``{"date": UTC ISO 8601 to the second, "commit": git_commit(), "machine": machine()}``."""
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {"date": date, "commit": git_commit(), "machine": machine()}


def describe_machine(value: dict[str, Any] | str | None) -> str:
    """One line for a ``machine`` field: a recorded string as is, a ``machine()`` dict as
    ``host: CPU, N cores, torch threads T[, GPU]``."""
    if not isinstance(value, dict):
        return str(value or "unknown")
    features = f" ({' '.join(value['cpu_features'])})" if value.get("cpu_features") else ""
    text = (f"{value.get('hostname')}: {value.get('cpu')}{features}, {value.get('cpu_count')} cores, torch threads "
            f"{value.get('threads')}")
    return text + (f", {value['gpu']}" if value.get("gpu") else "")


def write_result(path: str | Path, title: str, section: str, tables: list[dict[str, Any]],
                 data: Any = None, notes: list[str] | None = None) -> Path:
    """A table file for ``results/`` (see ``lrlightning.results_doc``): ``title``, ``section``, date, commit, machine,
    the command that ran (``sys.argv``, the script relative to the checkout), ``tables`` (each ``columns``, ``rows`` of strings, optional ``caption`` and
    ``lines``), ``notes`` and the raw ``data``. Creates the parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    argv = [str(script.relative_to(CHECKOUT)) if script.is_relative_to(CHECKOUT) else sys.argv[0], *sys.argv[1:]]
    record = {"title": title, "section": section, **provenance(), "command": "python " + shlex.join(argv),
              "tables": tables, "notes": notes or [], "data": data}
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def publish_table(path: str | Path, title: str, section: str, columns: list[str], rows: list[list[str]],
                  footnote: str, data: Any = None) -> Path:
    """Print one table and its footnote, and write them as a result file (``write_result``); returns the path."""
    print(format_table(columns, rows))
    print(footnote)
    written = write_result(path, title, section, [{"columns": columns, "rows": rows, "lines": [footnote]}], data=data)
    print(f"wrote {written}")
    return written
