"""CPU memory that stays in the process. glibc returns large freed blocks to the system (``munmap``, heap trimming)
and faults fresh pages in for the next allocation of the same size, so on the CPU every layer's output costs page
faults; on small convolutions that dominates the time (the project's measurements: a 16-channel 3×3 conv at batch
32 on 28×28 runs 4–6× faster once freed memory is kept). ONNX Runtime, jemalloc and tcmalloc keep freed memory by
design; ``retain_freed_memory`` makes glibc do the same for this process."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
_retained = False


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc serve allocations up to 32 MiB from the heap and keep up to ``trim_threshold`` bytes (default
    1 GiB) of freed memory instead of returning it to the system. Process-wide, for the rest of its life; no-op
    (False) where the C library is not glibc. Returns whether it applied."""
    global _retained
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _retained = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _retained


def freed_memory_retained() -> bool:
    """Whether ``retain_freed_memory`` applied in this process."""
    return _retained
