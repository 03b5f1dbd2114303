"""benchmarks/studies/cost_model.py: the static H100 cost model behind RESULTS.md's predicted-speedup table."""

from benchmarks.studies import cost_model as cm
from benchmarks.compile_gate.launch_capture import SHAPES


def test_roofline_takes_the_binding_limit():
    n = 1 << 20
    copy = cm.Op("copy", 1, 1)
    assert copy.seconds(n) == 2 * n * cm.BYTES / cm.HBM_BPS  # memory-bound
    mix = cm.Op("mix", 1, 1, 2 * 512 * 512, 2 * 512 * 512)
    assert mix.seconds(n) == 2 * 512 * 512 * n / cm.FMA_FLOPS  # compute-bound on FMA
    assert mix.seconds(n, "tf32x3") < mix.seconds(n)  # three tensor-core passes still beat FMA
    assert cm.Op("tiny", 0, 0).seconds(n) == cm.MIN_LAUNCH_S


def test_rows_cover_every_level_and_fused_moves_less_than_eager():
    rows = cm.rows()
    assert len(rows) == 3 * sum(s.n_block for s in SHAPES)
    for r in rows:
        fused = sum(o.megabytes(r.n) for o in r.fused)
        eager = sum(o.megabytes(r.n) for o in r.eager)
        if r.kernel != "backward step":  # the reversible backward also rebuilds its inputs
            assert fused < eager / 3, (r.shape, r.level, r.kernel)
        assert sum(o.mix_flops for o in r.fused) >= sum(o.mix_flops for o in r.eager)
    assert [lv for lv in cm.levels(SHAPES[1])][-1] == (384, 4, 4)


def test_markdown_has_a_measured_column_to_fill():
    text = cm.markdown()
    assert "measured fused µs" in text and "predicted speedup" in text
    assert text.count("\n| cifar32-affine |") == 9
