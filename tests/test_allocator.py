"""Freed CPU memory kept in the process, and latency tables that know whether it is."""
import sys

import pytest
import torch

from lrlightning.allocator import freed_memory_retained, retain_freed_memory
from lrlightning.latency import device_key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_retaining_freed_memory_applies_on_glibc_and_changes_the_latency_key():
    before = device_key(torch.device("cpu"))
    assert retain_freed_memory() is True and freed_memory_retained()
    after = device_key(torch.device("cpu"))
    assert after.endswith(before.split(" threads")[1]) and "threads retained memory" in after
    assert "retained memory" not in before or before == after
