"""Measured speed: latency tables and timing, the allocation check, the CPU and the serving form."""
