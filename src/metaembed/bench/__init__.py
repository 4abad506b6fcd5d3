"""Efficiency measurement: this machine's ceilings (bandwidth, GEMM peaks) and the scoring profiler."""

from __future__ import annotations
