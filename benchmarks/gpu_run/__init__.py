"""The one-command GPU run: ``python -m benchmarks.gpu_run --out OUT`` (runner.py: phases, budgets, exit status;
checks.py: what each phase must record; measure.py: scales and timers; phases.py, kernels.py: what each phase measures; report.py: results and plots)."""
