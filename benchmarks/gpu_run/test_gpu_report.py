"""The GPU run's report never loses a finished phase's numbers: a phase that raises, one that overruns its
budget and one that records only some of its fields each cost their own rows, and results.json, RESULTS.md and
the summary are still written with every other phase's numbers."""

import dataclasses
import json
import time

from benchmarks.gpu_run import phases as gpu_phases, report as gpu_report, runner as gpu_run
from benchmarks.gpu_run.measure import TRAIN_IMPLS

FAKE_MS = {impl: 100.0 + i for i, impl in enumerate(TRAIN_IMPLS)}


def _good_training(ctx):
    for impl, ms in FAKE_MS.items():
        ctx.rec.put("impls", impl, dict(status="ok", ms=ms, peak_gb=0.5, first_loss=5.0, loss=5.0))


def _raises_after_one_row(ctx):
    ctx.rec.put("cifar-tiny", "eager", dict(status="ok", ms=7.0, images_per_s=285.7, batch=2, finite=True))
    raise RuntimeError("sampling broke")


def _overruns_its_budget(ctx):
    ctx.rec.append("rows", dict(kernel="coupling_mix", fused=True, shape=[2, 4, 4, 4], ms=1.25))
    time.sleep(60)


def _partial_fields(ctx):
    ctx.rec.append("roundtrip", dict(impl="fastglow-reversible", shape="cifar-tiny", dtype="float32",
                                     status="error: ValueError: no"))
    ctx.rec.append("roundtrip", dict(impl="eager", shape="cifar-tiny", dtype="float32", rel_error=3e-7))
    ctx.rec.append("vs_reference", dict(dtype="float64"))


def test_failed_timed_out_and_partial_phases_cost_only_their_own_rows(tmp_path, monkeypatch, capsys):
    for name, fn in (("train_cifar", _good_training), ("sampling", _raises_after_one_row),
                     ("kernels", _overruns_its_budget), ("accuracy", _partial_fields)):
        monkeypatch.setattr(gpu_phases, f"phase_{name}", fn)  # the forked phase children inherit these
    monkeypatch.setattr(gpu_run, "PHASES", tuple(dataclasses.replace(p, cpu_s=6) if p.name == "kernels" else p
                                                  for p in gpu_run.PHASES))
    monkeypatch.setattr(gpu_run, "GRACE_S", 0.5)
    args = gpu_run.build_parser().parse_args(["--out", str(tmp_path), "--scale", "cpu", "--budget", "120",
                                              "--phases", "train_cifar,kernels,sampling,accuracy"])
    args.budget = 120.0
    results = gpu_run.run_all(args, "test", started=time.monotonic())
    gpu_run.write_outputs(results, args, "test")

    status = {name: r["status"] for name, r in results.items()}
    assert status == dict(env="ok", train_cifar="ok", kernels="timeout", sampling="failed", accuracy="incomplete")
    assert "sampling broke" in results["sampling"]["message"]
    saved = json.loads((tmp_path / "results.json").read_text())["phases"]
    assert saved["kernels"]["data"]["rows"][0]["ms"] == 1.25  # recorded before the kill: kept
    assert saved["sampling"]["data"]["cifar-tiny"]["eager"]["images_per_s"] == 285.7
    report = (tmp_path / "RESULTS.md").read_text()
    for impl, ms in FAKE_MS.items():
        assert f"| {impl} | {ms:.4g} |" in report
    assert "| coupling_mix | 2x4x4x4 | 1.25 |" in report and "| cifar-tiny | eager | 2 | 7 | 285.7 |" in report
    assert "| eager | cifar-tiny | float32 | 3e-07 |" in report  # the complete row of a partial phase
    assert "| fastglow-reversible | cifar-tiny | float32 |  |  | error: ValueError: no |" in report
    out = capsys.readouterr().out
    assert "CIFAR training step >= 2.0x reference eager fp32" in out and "summary failed" not in out


def test_malformed_records_give_a_report_with_every_readable_section():
    results = {
        "env": dict(status="failed", data=None),
        "train_cifar": dict(status="ok", data=dict(impls={"eager": dict(status="ok", ms=10.0, peak_gb=1.0),
                                                          "fastglow-reversible": dict(status="ok", ms=4.0)})),
        "kernels": dict(status="incomplete", data=dict(rows=[dict(kernel="mix", fused=True)], copy_gbps_large=None)),
        "memory_vs_k": dict(status="ok", data=dict(rows=[dict(impl="eager", status="ok")])),
        "max_batch": dict(status="ok", data=dict(rows=[dict(impl="fastglow-reversible", limit_gb=80.0)])),
        "accuracy": dict(status="ok", data=dict(roundtrip=[{}], vs_reference=[dict(shape={"in_channel": 1})])),
        "profile": dict(status="ok", data=dict(impls={"eager": dict(top=[{}])})),
    }
    report = gpu_report.markdown(results, "cmd")
    assert "| fastglow-reversible | 4 | 2.5 |" in report  # the training numbers survive the rest
    assert "section reference_section not written: KeyError" in report  # the one unreadable section, named
    rows = gpu_report.targets(results)
    assert len(rows) == 8 and rows[0][2] == "met" and rows[2][2] == "n/a"
    assert "faster than per-Flow checkpoint" in gpu_report.summary(results)
