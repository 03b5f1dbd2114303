"""One-off measurements behind benchmarks/RESULTS.md, each run as ``python -m benchmarks.studies.NAME``."""
