"""benchmarks/studies/launch_counts.py: a fixed channel permutation adds no launch to a flow step."""

from benchmarks.studies.launch_counts import level_launches
from fastglow.permutation import PERMUTATIONS

FIXED = ("shuffle", "reverse")


def test_fixed_permutations_add_no_launch_to_a_flow_step():
    """Triton: the permutation is folded into the step's mix, so a level of K steps runs the same K + 1 fused
    kernels as with the 1x1 conv, less the level's one batched LU launch each way (nothing to compute)."""
    k = 4
    counts = {p: level_launches("triton", n_flow=k, permutation=p) for p in PERMUTATIONS}
    for p in FIXED:
        for phase in ("forward", "backward"):
            assert counts[p]["triton"][phase] * k == counts["conv"]["triton"][phase] * k - 1, (p, phase)
            assert counts[p]["aten"][phase] <= counts["conv"]["aten"][phase], (p, phase)
    assert counts["shuffle"]["triton"]["forward"] * k == k + 1
