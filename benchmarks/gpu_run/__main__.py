"""``python -m benchmarks.gpu_run``: see :mod:`benchmarks.gpu_run.runner`."""

from benchmarks.gpu_run.runner import main

raise SystemExit(main())
