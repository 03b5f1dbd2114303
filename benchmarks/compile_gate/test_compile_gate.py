"""The sm_90 compile gate (benchmarks/compile_gate/report.py): every launch specialisation of the real models
compiles for the H100 within its limits. Compiled results are cached under .cache/compile_gate/ by a hash
of the kernel source and specialisation, so only changed kernels recompile; a fresh clone compiles a
representative subset (one specialisation per kernel, dtype and tile sizes) in about two minutes."""

import time

from benchmarks.compile_gate import report as gate
from benchmarks.compile_gate import launch_capture, sm90

COLD_BUDGET_S = 240  # a fresh clone compiles everything; warm runs take seconds


def _row(result, dtype="float32", programs=1000, num_warps=4):
    ptr = "*fp64" if dtype == "float64" else "*fp32"
    spec = launch_capture.Spec("m:k", (("x", ptr),), (), (), num_warps, 3)
    launch = launch_capture.Launch(spec, "s", dtype, "forward", "12x4x4", (programs, 1, 1))
    return gate.Row(spec, dict(dict(regs=64, stack=0, spill_stores=0, spill_loads=0, shared=0), **result),
                    [launch])


def test_occupancy_follows_the_h100_limits():
    assert sm90.ctas_per_sm(32, 0, 4)["ctas"] == 16  # thread-limited: 2048 / 128
    assert sm90.ctas_per_sm(255, 0, 4)["by_regs"] == 2  # 256 regs/thread -> 8192 per warp, 8 warps per SM
    assert sm90.ctas_per_sm(129, 0, 8)["by_regs"] == 1  # 136 regs/thread rounded -> 4352/warp, 15 warps
    assert sm90.ctas_per_sm(64, 100_000, 4)["by_smem"] == 2
    assert sm90.ctas_per_sm(64, sm90.SMEM_PER_CTA + 1, 4)["ctas"] == 0


def test_ptxas_log_is_parsed():
    log = ("ptxas info    : Function properties for k\n"
           "    6184 bytes stack frame, 6200 bytes spill stores, 6300 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 6184 bytes cumulative stack size, 16 bytes smem\n")
    assert sm90.parse_ptxas(log) == dict(regs=32, static_smem=16, stack=6184, spill_stores=6200, spill_loads=6300)


def test_gate_rules_fail_what_they_should():
    assert _row({}).failures() == []
    assert "spills" in _row(dict(spill_stores=4, spill_loads=4)).failures()[0]
    assert _row(dict(spill_stores=4, spill_loads=4), dtype="float64").failures() == []  # f64 may spill
    assert "shared memory" in _row(dict(shared=sm90.SMEM_PER_CTA + 1), dtype="float64").failures()[0]
    assert "CTA/SM" in _row(dict(regs=255), num_warps=8).failures()[0]
    assert _row(dict(regs=255), num_warps=8, programs=200).failures() == []  # one wave: occupancy moot
    assert "compile error" in _row(dict(error="boom")).failures()[0]


def test_capture_finds_every_kernel_and_phase():
    shape = launch_capture.SHAPES[0]
    launches = launch_capture.capture(shape, "float32")
    names = {l.spec.name for l in launches}
    assert {"_squeeze_fwd_kernel", "_lu_weight_fwd_kernel", "_lu_weight_bwd_kernel"} <= names
    assert len(names) >= 6
    assert {l.phase for l in launches} == set(launch_capture.PHASES)
    first = next(l for l in launches if l.spec.name == "_squeeze_fwd_kernel")  # the image, at the real batch
    assert first.where == f"3x{shape.img_size}x{shape.img_size}"
    block = dict(first.spec.constexprs)["BLOCK"]
    assert first.programs == -(-shape.batch * 3 * shape.img_size ** 2 // block)


def test_sm90_gate_passes():
    """A representative specialisation per kernel, dtype and level (the full sweep: the report's CLI)."""
    start = time.perf_counter()
    launches = launch_capture.capture_all()
    subset = gate.representative(launches)
    assert {l.spec.name for l in subset} == {l.spec.name for l in launches}
    rows = gate.run_gate(subset, timeout=COLD_BUDGET_S)
    failing = [r for r in rows if r.failures()]
    assert not failing, "\n" + gate.markdown(failing)
    counts = gate.summary(rows)
    assert counts["float32"]["specialisations"] > 0 and counts["float64"]["specialisations"] > 0
    assert time.perf_counter() - start < COLD_BUDGET_S
