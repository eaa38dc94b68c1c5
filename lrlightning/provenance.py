"""Where and when a result was made: the date, the git commit of the code, and the machine. Every result file
(``summary.json``, the benchmark JSON under ``results/``) carries these three fields."""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Host name, CPU model, CPU count, torch's intra-op thread count, GPU name (None without CUDA), versions."""
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": str(torch.__version__), "python": platform.python_version()}


def provenance() -> dict[str, Any]:
    """``{"date": UTC ISO 8601 to the second, "commit": git_commit(), "machine": machine()}``."""
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {"date": date, "commit": git_commit(), "machine": machine()}


def describe_machine(value: dict[str, Any] | str | None) -> str:
    """One line for a ``machine`` field: a recorded string as is, a ``machine()`` dict as
    ``host: CPU, N cores, T threads[, GPU]``."""
    if not isinstance(value, dict):
        return str(value or "unknown")
    text = f"{value.get('hostname')}: {value.get('cpu')}, {value.get('cpu_count')} cores, {value.get('threads')} threads"
    return text + (f", {value['gpu']}" if value.get("gpu") else "")
