"""What CPU this is, as far as speed goes: its model name and the vector and matrix instruction sets that decide
how fast int8, bf16 and fp32 convs run (AVX2, AVX-512, VNNI, AMX). Recorded with every timing, and part of every
CPU latency cache key, so that a figure says which processor made it and a table timed on one is never reused on
another. Pure Python."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
               "amx_int8")
"""The ``/proc/cpuinfo`` flags recorded, in this order."""


def cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    for line in cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_features() -> tuple[str, ...]:
    """Which of ``SPEED_FLAGS`` the CPU has (from ``/proc/cpuinfo``'s flags; empty where there is none)."""
    for line in cpuinfo_lines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in SPEED_FLAGS if flag in flags)
    return ()


def features_text(features: list[str] | tuple[str, ...]) -> str:
    """``"avx2 fma"``: recorded speed flags as one text, ``"no AVX2"`` for none."""
    return " ".join(features) or "no AVX2"


def cpu_label() -> str:
    """``"AMD EPYC (avx2 fma)"``: the model and its speed flags, for keys and one-line records."""
    return f"{cpu_model()} ({features_text(cpu_features())})"


def int8_path() -> str:
    """How int8 dot products run on this CPU: ``"amx"``, ``"vnni"`` (AVX-512 or AVX VNNI) or ``"avx2"`` (u8×s8
    pairs that can saturate 16 bits), else ``"none"``."""
    features = set(cpu_features())
    if "amx_int8" in features:
        return "amx"
    if features & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "avx2" if "avx2" in features else "none"


def cpu_record() -> dict:
    """``{"cpu": model, "cpu_features": [...], "int8_path": ...}`` for result files."""
    return {"cpu": cpu_model(), "cpu_features": list(cpu_features()), "int8_path": int8_path()}
