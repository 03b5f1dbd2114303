"""benchmarks/harness.py: the timer's rounds (rotation, warm-up, time limit), every implementation the builder
knows at the same weights, and the interleaved timing in a fresh process."""

import pytest
import torch

from benchmarks.harness import (IMPLEMENTATIONS, ModelShape, build_model, time_in_fresh_process, time_rounds,
                                training_step)

TINY = ModelShape("tiny", 1, 8, 2, 2, 4, True, 2)


def test_rounds_rotate_the_order_after_the_warm_up():
    calls = []
    steps = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    result = time_rounds(steps, 3, warmup=1, before_timing=lambda: calls.append("|"))
    assert "".join(calls) == "abc|" + "abc" + "bca" + "cab"
    assert all(len(r["wall_s"]) == len(r["cpu_s"]) == 3 for r in result.values())
    assert [result[n]["first"] for n in "abc"] == [1, 2, 3]  # the warm-up's outputs
    assert [result[n]["last"] for n in "abc"] == [12, 13, 11]  # the last round's: c, a, b
    assert all(r["first_s"] >= 0 for r in result.values())


def test_rounds_stop_once_the_time_is_spent_but_not_before_the_least():
    result = time_rounds({"step": lambda: sum(range(10_000))}, 50, seconds=0.0, min_rounds=2)
    assert len(result["step"]["wall_s"]) == 2
    once = time_rounds({"step": lambda: None}, 1, min_rounds=2)
    assert len(once["step"]["wall_s"]) == 1 and once["step"]["first_s"] == once["step"]["wall_s"][0]


def test_every_implementation_starts_from_the_reference_loss(tmp_path):
    """The same weights and batch: the same first loss (rosinality's model.py here a stand-in with its
    constructor); the checkpointed ones keep only each Flow's input, the maths unchanged."""
    (tmp_path / "model.py").write_text(
        "from fastglow.reference import Glow as _Glow\n"
        "class Glow(_Glow):\n"
        "    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True):\n"
        "        super().__init__(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels=4)\n")
    losses = {}
    for impl in IMPLEMENTATIONS:
        model, run, x = build_model(impl, TINY, rosinality=tmp_path, backend="eager")
        losses[impl] = training_step(model, run, x, torch.optim.SGD(model.parameters(), lr=0.0))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), impl
    for impl, loss in losses.items():
        assert torch.isfinite(loss) and abs(loss - losses["eager"]) <= 1e-5 * abs(losses["eager"]), impl
    with pytest.raises(ValueError, match="unknown implementation"):
        build_model("rosinality-reversible", TINY)


def test_interleaved_steps_in_a_fresh_process():
    runs = [dict(name=impl, impl=impl, shape=TINY, options=dict(backend="eager") if impl != "eager" else {})
            for impl in ("fastglow-reversible", "eager")]
    timing = time_in_fresh_process(runs, rounds=2)
    for key in ("wall_s", "cpu_s"):
        assert set(timing[key]) == {"fastglow-reversible", "eager"}
        assert all(len(t) == 2 and min(t) > 0 for t in timing[key].values())
