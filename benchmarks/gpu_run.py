"""One command that measures every GPU target of issue #11 in one device call and leaves the results as files.

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu_run --out OUT        (or: make bench-gpu OUT=OUT)

Installs nothing. With CUDA it runs the real shapes (one H100: about 9 minutes, ``--budget`` seconds at most);
without CUDA the same phases run at tiny shapes on the CPU, the Triton kernels through the interpreter, as a
smoke test. Every phase runs in its own process under its own time budget (cut to what is left of the total):
one that fails, hangs or runs out of time is reported and stopped, the others go on, and what it recorded
before stopping is kept. Under OUT: ``results.json`` (every number), ``RESULTS.md`` (a section for
benchmarks/RESULTS.md), ``train_step.png``, ``memory_vs_k.png``, ``kernels.png``, ``phase_<name>.json`` and
``logs/<name>.log``; on stdout, the device line and versions first and a one-screen summary last (each target,
its measured value, met or missed). Exit status 0 when every phase produced all its numbers, else 1.

``--rosinality PATH``: also train rosinality/glow-pytorch's ``model.py`` from PATH (a git-ignored folder, e.g.
``third_party/glow-pytorch``, carried to the device; never committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from benchmarks.gpu_measure import SCALES, TRAIN_IMPLS as TRAIN

REPO = Path(__file__).resolve().parents[1]
REPORT_RESERVE_S = 8.0  # kept back from the total budget for the report
GRACE_S = 5.0  # a phase process gets this long past its budget before it is killed


# ----------------------------------------------------------------------------------------------
# What each phase must produce (checked from its JSON: a phase that "ran" but measured nothing fails)
# ----------------------------------------------------------------------------------------------
def _missing_impls(expected: Callable) -> Callable:
    def check(d, scale, args):
        impls = d.get("impls", {})
        return [f"{i}: {impls.get(i, {}).get('status', 'not measured')}" for i in expected(args)
                if not (impls.get(i, {}).get("status") == "oom"
                        or (impls.get(i, {}).get("status") == "ok" and impls[i].get("ms", 0) > 0
                            and impls[i].get("peak_gb", 0) > 0))]
    return check


def _check_env(d, scale, args):
    return [] if d.get("device") and d.get("torch") and d.get("triton") else ["no device line or versions"]


def _check_tests(d, scale, args):
    problems = [] if d.get("passed") else ["no test passed"]
    if d.get("failed") or d.get("error"):
        problems.append(f"{d.get('failed')} failed, {d.get('error')} errors: {', '.join(d.get('failures', []))}")
    return problems


def _check_kernels(d, scale, args):
    rows = d.get("rows", [])
    errors = [f"{r['kernel']} {r['shape']}: {r['status']}" for r in rows if "status" in r]
    measured = [r for r in rows if r.get("ms", 0) > 0]
    shapes = {tuple(r["shape"]) for r in measured if r["fused"] and r.get("of_copy", 0) > 0}
    problems = errors + [f"no fused kernel measured at {s}" for s in scale["kernel_shapes"] if tuple(s) not in shapes]
    if not any(r["kernel"].startswith("lu_weight_level") for r in measured):
        problems.append("no LU level timing")
    return problems + ([] if d.get("copy_gbps_large", 0) > 0 else ["no copy bandwidth"])


def _check_memory(d, scale, args):
    status = {(r["impl"], r["n_flow"]): r["status"] if r["status"] != "ok" or r["peak_gb"] > 0 else "no peak"
              for r in d.get("rows", [])}
    return [f"{i} at K={k}: {status.get((i, k), 'not measured')}" for i in TRAIN for k in scale["depths"]
            if status.get((i, k)) not in ("ok", "oom")]


def _check_max_batch(d, scale, args):
    rows = {(r["impl"], r["limit_gb"]): r for r in d.get("rows", [])}
    return [f"{i} within {lim} GB: no search" for i in ("fastglow-reversible", "eager") for lim in scale["limits_gb"]
            if (i, lim) not in rows or (i == "fastglow-reversible" and rows[(i, lim)]["largest_ok"] < 1)]


def _check_sampling(d, scale, args):
    return [f"{s} {i}: no images/s" for s in (scale["cifar"]["name"], scale["celeba"]["name"])
            for i in ("fastglow-reversible", "eager")
            if not (d.get(s, {}).get(i, {}).get("images_per_s", 0) > 0 and d[s][i]["finite"])]


def _check_accuracy(d, scale, args):
    trips = [r for r in d.get("roundtrip", []) if "rel_error" in r]
    compared = [r for r in d.get("vs_reference", []) if "grads_max" in r]
    return ([] if len(trips) == 6 else [f"{len(trips)} of 6 round trips"]) + \
        ([] if len(compared) == 2 else [f"{len(compared)} of 2 comparisons with the reference"])


def _check_options(d, scale, args):
    variants = d.get("variants", {})
    return [f"{n}: {r.get('status')}" for n, r in variants.items() if r.get("status") != "ok"] + \
        ([] if len(variants) == 6 else ["not every variant measured"])


def _compile_failed(results) -> bool:
    return results.get("train_cifar_compiled", {}).get("status") != "ok"


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    gpu_s: float  # budget on the GPU, seconds
    cpu_s: float  # budget of the CPU smoke run
    check: Callable
    needed: Callable = lambda results: True


# Budgets: GPU (sum 525 s, the default total 530 s: 9 minutes on one H100), CPU smoke. The order is the order of
# importance: what the total budget cuts first is at the end.
PHASES = (
    Phase("env", 15, 15, _check_env),
    Phase("tests", 45, 20, _check_tests),
    Phase("train_cifar", 60, 15, _missing_impls(lambda a: TRAIN + (("rosinality",) if a.rosinality else ()))),
    Phase("train_cifar_compiled", 110, 15, _missing_impls(lambda a: ("compiled",))),
    Phase("kernels", 30, 12, _check_kernels),
    Phase("memory_vs_k", 55, 15, _check_memory),
    Phase("max_batch", 55, 15, _check_max_batch),
    Phase("sampling", 30, 12, _check_sampling),
    Phase("accuracy", 30, 15, _check_accuracy),
    Phase("train_celeba", 55, 15, _missing_impls(lambda a: TRAIN)),
    Phase("gpu_options", 40, 15, _check_options),
    Phase("train_cifar_compiled_per_flow", 60, 15, _missing_impls(lambda a: ("compiled-per-flow",)),
          needed=_compile_failed),
)


# ----------------------------------------------------------------------------------------------
# Running the phases
# ----------------------------------------------------------------------------------------------
def run_phase(phase: Phase, args, scale_name: str, seconds: float) -> dict:
    """Run one phase in its own process group for at most ``seconds`` (+ grace); -> its result record."""
    out = Path(args.out)
    json_path, log_path = out / f"phase_{phase.name}.json", out / "logs" / f"{phase.name}.log"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_run", "--phase", phase.name, "--out", str(out),
           "--scale", scale_name, "--phase-seconds", f"{seconds:.1f}"]
    if args.rosinality:
        cmd += ["--rosinality", args.rosinality]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep))
    if scale_name == "cpu":  # the kernels through the interpreter; one thread (2 oversubscribed cores: 100x)
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=seconds + GRACE_S)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the phase's whole process group (pytest, compile workers)
            proc.wait()
            status = "timeout"
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    message = "" if status == "ok" else (f"stopped after {seconds:.0f} s budget" if status == "timeout"
                                         else _last_error(log_path))
    return dict(status=status, seconds=round(time.monotonic() - t0, 1), budget_s=round(seconds, 1),
                message=message, data=data)


def _last_error(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def judge(phase: Phase, record: dict, scale, args) -> dict:
    """A phase that exited cleanly but lacks numbers is 'incomplete'; a stopped one keeps its partial data."""
    problems = phase.check(record["data"], scale, args) if record["data"] else ["no numbers recorded"]
    if record["data"].get("stopped"):
        record["message"] = "; ".join(filter(None, [record["message"], record["data"]["stopped"]]))
    if problems and record["status"] == "ok":
        record["status"] = "incomplete"
    if problems:
        record["message"] = "; ".join(filter(None, [record["message"], *problems]))[:400]
    return record


def run_all(args) -> dict:
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results: dict = {}
    scale_name = args.scale
    for phase in PHASES:
        if args.phases and phase.name not in args.phases and phase.name != "env":
            continue
        if not phase.needed(results):
            results[phase.name] = dict(status="not needed", seconds=0, message="torch.compile(reference) measured")
            continue
        budget = phase.gpu_s if scale_name == "gpu" else phase.cpu_s
        seconds = min(budget, deadline - time.monotonic() - REPORT_RESERVE_S)
        if seconds < 5:
            results[phase.name] = dict(status="skipped", seconds=0, budget_s=budget,
                                       message=f"skipped: the total budget of {args.budget:.0f} s ran out")
        else:
            record = run_phase(phase, args, scale_name if phase.name != "env" else args.scale, seconds)
            if phase.name == "env" and scale_name == "auto":
                scale_name = "gpu" if record["data"].get("cuda") else "cpu"
                record["data"]["scale"] = scale_name
            results[phase.name] = judge(phase, record, dataclasses.asdict(SCALES[scale_name]), args)
        print(_progress_line(phase.name, results[phase.name]), flush=True)
        if phase.name == "env":
            env = results["env"].get("data", {})
            print(f"device: {env.get('device')}\nversions: python {env.get('python')}, torch {env.get('torch')}, "
                  f"triton {env.get('triton')}, numpy {env.get('numpy')}, fastglow {env.get('fastglow')}; "
                  f"commit {env.get('git_commit')}", flush=True)
    return results


def _progress_line(name: str, record: dict) -> str:
    return f"[{name}] {record['status']} in {record.get('seconds', 0):.1f} s" + \
        (f": {record['message']}" if record.get("message") else "")


def write_outputs(results: dict, args, command: str) -> None:
    from benchmarks import gpu_report
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(dict(command=command, budget_s=args.budget, phases=results),
                                                 indent=1, default=str))
    (out / "RESULTS.md").write_text(gpu_report.markdown(results, command) + "\n")
    try:
        written = gpu_report.plots(results, out)
    except Exception as err:  # a plotting problem must not lose the numbers already written
        written = [f"(plots failed: {err})"]
    print("\n" + gpu_report.summary(results))
    print(f"\nwritten under {out}: results.json, RESULTS.md, {', '.join(written)}, phase_*.json, logs/")


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def phase_main(args) -> int:
    """Inside a phase's process: run the phase, recording into phase_<name>.json as it goes."""
    import torch

    from benchmarks import gpu_phases
    scale = args.scale if args.scale != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    rec = gpu_phases.Recorder(Path(args.out) / f"phase_{args.phase}.json")
    ctx = gpu_phases.PhaseContext(SCALES[scale], rec, time.monotonic() + args.phase_seconds - 2, Path(args.out),
                                  args.rosinality)
    try:
        getattr(gpu_phases, f"phase_{args.phase}")(ctx)
    except Exception:
        traceback.print_exc()
        rec.set("error", traceback.format_exc(limit=3).strip().splitlines()[-1])
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    p.add_argument("--budget", type=float, default=530.0, help="total seconds for all phases (default 530)")
    p.add_argument("--scale", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: real shapes with CUDA, tiny shapes without")
    p.add_argument("--phases", type=lambda s: s.split(","), help="run only these phases (comma-separated)")
    p.add_argument("--rosinality", help="folder holding rosinality/glow-pytorch's model.py: another baseline")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--phase-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rosinality:
        args.rosinality = str(Path(args.rosinality).resolve())
        if not (Path(args.rosinality) / "model.py").is_file() and not Path(args.rosinality).is_file():
            print(f"error: --rosinality {args.rosinality}: no model.py there", file=sys.stderr)
            return 2
    if args.phases:
        unknown = set(args.phases) - {p.name for p in PHASES}
        if unknown:
            print(f"error: unknown phases {sorted(unknown)}; known: {[p.name for p in PHASES]}", file=sys.stderr)
            return 2
    if args.phase:
        return phase_main(args)
    command = "python -m benchmarks.gpu_run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_all(args)
    write_outputs(results, args, command)
    return 0 if all(r["status"] in ("ok", "not needed") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
