"""Measured speed: latency tables and timing, the allocation check, the CPU and the serving form."""

from .measure import layer_inputs, measured_speedup

__all__ = ["layer_inputs", "measured_speedup"]
