"""``python -m benchmarks.ablation``: the permutation x coupling ablation, :mod:`benchmarks.studies.ablation`."""

from benchmarks.studies.ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
