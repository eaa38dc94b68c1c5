"""Freed CPU memory kept in the process, and latency tables that know whether it is."""
import sys

import pytest
import torch

from lrlightning.speed import allocator
from lrlightning.speed.allocator import freed_memory_retained, retain_freed_memory
from lrlightning.speed.cpu import cpu_label
from lrlightning.speed.latency import device_key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_retaining_freed_memory_applies_on_glibc_and_changes_the_latency_key():
    # Start from a process whose flag says "not retained" whatever ran before (retain_freed_memory is process-wide
    # and other tests, e.g. lrl-train runs, may have applied it); the call below sets it again for good.
    allocator._retained = False
    before = device_key(torch.device("cpu"))
    threads, version = torch.get_num_threads(), torch.__version__
    assert before == f"cpu {cpu_label()} {threads} threads channels_last torch {version}"
    assert retain_freed_memory() is True and freed_memory_retained()
    after = device_key(torch.device("cpu"))
    assert after == f"cpu {cpu_label()} {threads} threads retained memory channels_last torch {version}"
