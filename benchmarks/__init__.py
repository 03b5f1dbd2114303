"""Benchmarks of fastglow, run as modules from the repository root (``python -m benchmarks.NAME``): harness.py
(one model builder, step, timer and memory probe for all), suites/ (pytest-benchmark), gpu_run/ (the
one-command GPU run), compile_gate/ (sm_90), studies/ (the measurements behind RESULTS.md)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the working folder of every child process
