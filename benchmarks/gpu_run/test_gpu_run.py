"""The one-command GPU run (benchmarks/gpu_run/) as a CPU smoke test: at tiny shapes, within its budget, every
phase must produce its numbers (checked here from the JSON, not only from the run's own verdict); and the runner
stops a phase that overruns its budget, keeping the others."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from benchmarks import ROOT
from benchmarks.gpu_run import runner as gpu_run
from benchmarks.gpu_run.measure import SCALES, measure_training, quick
from benchmarks.gpu_run.phases import largest_batch

SMOKE_BUDGET_S = 85


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _run(out, budget: float, *flags):
    """The command in a fresh process, as a user runs it (it decides TRITON_INTERPRET itself)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--out", str(out), "--scale", "cpu",
                           "--budget", str(budget), *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget + 30)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    proc = _run(out, SMOKE_BUDGET_S)
    return proc, out, json.loads((out / "results.json").read_text())["phases"]


def test_every_phase_ran_and_the_run_says_so(smoke):
    proc, out, phases = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in gpu_run.PHASES} == set(phases)
    assert all(r["status"] in ("ok", "not needed") for r in phases.values()), phases
    first = proc.stdout.splitlines()[:3]  # the env phase's line, then the device line and the versions
    assert first[1].startswith("device: CPU") and first[2].startswith("versions:") and "torch 2." in first[2]
    for target in ("2.0x reference eager", "1.3x torch.compile", "checkpoint", "80% of copy", "1/5 of eager",
                   "batch >= 64", "sampling >= 2x"):
        assert target in proc.stdout.split("target")[-1]
    report = (out / "RESULTS.md").read_text()
    assert report.count("\n### ") >= 10 and "| fastglow-reversible |" in report
    for png in ("train_step.png", "memory_vs_k.png", "kernels.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_every_phase_recorded_its_numbers(smoke):
    _, _, phases = smoke
    d = {name: r.get("data", {}) for name, r in phases.items()}
    assert d["tests"]["passed"] >= 1 and d["tests"]["failed"] == 0
    eager_loss = d["train_cifar"]["impls"]["eager"]["first_loss"]
    for phase, impls in (("train_cifar", gpu_run.TRAIN), ("train_celeba", gpu_run.TRAIN),
                         ("train_cifar_compiled", ("compiled",))):
        for impl in impls:
            r = d[phase]["impls"][impl]
            assert _positive(r["ms"]) and _positive(r["peak_gb"]) and math.isfinite(r["loss"]), (phase, impl)
            if phase != "train_celeba":  # the same weights and batch: the same first loss
                assert abs(r["first_loss"] - eager_loss) <= 1e-5 * eager_loss, (phase, impl)
    assert {(r["impl"], r["n_flow"]) for r in d["memory_vs_k"]["rows"] if _positive(r["peak_gb"])} == \
        {(i, k) for i in gpu_run.TRAIN for k in (1, 2)}
    fused = [r for r in d["kernels"]["rows"] if r["fused"]]
    assert len(fused) >= 8 and all(_positive(r["ms"]) for r in fused)
    assert [r["largest_ok"] >= 1 for r in d["max_batch"]["rows"]] == [True] * 4
    for shape in ("cifar-tiny", "celeba-tiny"):
        assert all(_positive(d["sampling"][shape][i]["images_per_s"]) for i in ("fastglow-reversible", "eager"))
    assert len(d["accuracy"]["roundtrip"]) == 6 and max(r["rel_error"] for r in d["accuracy"]["roundtrip"]) < 1e-4
    assert all(r["log_p"] < 1e-4 and r["grads_max"] < 1e-3 for r in d["accuracy"]["vs_reference"])
    assert len(d["gpu_options"]["variants"]) == 6
    assert all(_positive(r["ms"]) for r in d["gpu_options"]["variants"].values())
    for impl in ("fastglow-reversible", "eager"):
        assert d["profile"]["impls"][impl]["top"] and _positive(d["profile"]["impls"][impl]["top"][0]["ms"])


def test_a_phase_past_its_budget_is_killed_with_what_it_started(tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(gpu_run, "GRACE_S", 0.0)
    args = gpu_run.build_parser().parse_args(["--out", str(tmp_path)])
    phase = next(p for p in gpu_run.PHASES if p.name == "tests")  # waits at least 1 s on its pytest
    record = gpu_run.run_phase(phase, args, "cpu", seconds=0.5)
    assert record["status"] == "timeout" and record["seconds"] < 3
    pytest_pid = int(re.search(r"pytest pid (\d+)", (tmp_path / "logs" / "tests.log").read_text()).group(1))
    assert _gone(pytest_pid)  # the phase's pytest went with it
    judged = gpu_run.judge(phase, record, {}, args)
    assert judged["status"] == "timeout" and "budget" in judged["message"]  # not re-labelled "incomplete"


def _gone(pid: int, wait_s: float = 1.0) -> bool:
    """The process no longer runs (reaped, or a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_a_failing_implementation_costs_its_row_only(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.py").write_text("raise RuntimeError('not a Glow')\n")
    proc = _run(tmp_path / "out", 60, "--phases", "train_cifar", "--rosinality", str(tmp_path / "broken"))
    record = json.loads((tmp_path / "out" / "results.json").read_text())["phases"]["train_cifar"]
    assert proc.returncode == 1 and record["status"] == "incomplete"
    assert "rosinality: error: RuntimeError: not a Glow" in record["message"]
    assert all(_positive(record["data"]["impls"][i]["ms"]) for i in gpu_run.TRAIN)
    assert "not a Glow" in (tmp_path / "out" / "logs" / "train_cifar.log").read_text()  # the traceback


def test_a_phase_that_exits_cleanly_without_numbers_is_incomplete():
    args = gpu_run.build_parser().parse_args(["--out", "unused"])
    phase = next(p for p in gpu_run.PHASES if p.name == "sampling")
    scale = {"cifar": {"name": "a"}, "celeba": {"name": "b"}}
    record = dict(status="ok", message="", data={"temperature": 0.7, "a": {}})
    assert gpu_run.judge(phase, record, scale, args)["status"] == "incomplete"


@pytest.mark.parametrize("threshold,cap,known", [(37, 1024, 0), (5, 1024, 0), (5000, 1024, 0), (0, 64, 0),
                                                 (300, 1024, 200), (2000, 1024, 1024)])
def test_largest_batch_search(threshold, cap, known):
    start = max(16, 2 * known)
    lo, hi, trials = largest_batch(lambda b: dict(batch=b, ok=b <= threshold), start, cap, lambda: False, known)
    if threshold >= cap:
        assert (lo, hi) == (cap, None)
    else:
        assert lo <= threshold < hi and hi - lo <= max(1, lo // 8)
    assert len(trials) <= 2 * math.log2(cap) + 2 and all(t["batch"] > known for t in trials)


def test_largest_batch_search_stops_when_time_runs_out():
    calls = []
    lo, hi, trials = largest_batch(lambda b: calls.append(b) or dict(batch=b, ok=True), 16, 1024,
                                   lambda: len(calls) >= 2)
    assert (lo, hi, len(trials)) == (32, None, 2)


def test_the_implementations_only_the_gpu_or_an_option_runs(tmp_path):
    """The per-Flow compile (the fallback when compiling the whole model overruns) and --rosinality (here a
    stand-in model.py with rosinality's constructor) give the eager reference's first loss."""
    (tmp_path / "model.py").write_text(
        "from fastglow.reference import Glow as _Glow\n"
        "class Glow(_Glow):\n"
        "    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True):\n"
        "        super().__init__(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels=4)\n")
    scale, cpu = SCALES["cpu"], torch.device("cpu")
    eager = measure_training("eager", scale.cifar, cpu, scale)
    for impl in ("compiled-per-flow", "rosinality"):
        r = measure_training(impl, scale.cifar, cpu, scale, rosinality=tmp_path)
        assert r["status"] == "ok" and abs(r["first_loss"] - eager["first_loss"]) <= 1e-5 * eager["first_loss"]


def test_the_default_and_quick_runs_fit_a_lending():
    """360 s of phases by default (a 600 s device call with the install, imports and plots, and a 15-minute
    lending with room for one retry); --quick fits its 150 s with the phases it runs; the float32 tests and the
    memory target's K come first."""
    args = gpu_run.build_parser().parse_args(["--out", "unused"])
    assert args.budget is None and gpu_run.DEFAULT_BUDGET_S <= 360 and gpu_run.QUICK_BUDGET_S <= 150
    quick_phases = [p for p in gpu_run.PHASES if gpu_run.phase_budget(p, "gpu", quick=True) > 0]
    assert sum(p.quick_s for p in quick_phases) + gpu_run.REPORT_RESERVE_S <= gpu_run.QUICK_BUDGET_S
    assert [p.name for p in quick_phases][:3] == ["env", "tests", "train_cifar"]
    gpu = SCALES["gpu"]
    assert gpu.depths[0] == 32 and quick(gpu).depths == (32, 8) and "not float64" in quick(gpu).tests_filter
    assert "tests/test_triton_backend.py" in gpu.tests and "tests/test_kernels_flow_step.py" == gpu.tests[0]
