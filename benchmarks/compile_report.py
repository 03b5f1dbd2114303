"""``python -m benchmarks.compile_report``: the sm_90 compile gate, :mod:`benchmarks.compile_gate.report`."""

from benchmarks.compile_gate.report import main

if __name__ == "__main__":
    raise SystemExit(main())
