"""pytest-benchmark suites (``pytest benchmarks/suites --benchmark-enable``) and their report."""
