"""The sm_90 compile gate: launch_capture.py records every Triton launch specialisation of the real models,
sm90.py compiles them for the H100 (ptxas -v, occupancy, cache), report.py judges and tabulates them
(``python -m benchmarks.compile_report``)."""
