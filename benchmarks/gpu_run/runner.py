"""One command that measures every GPU target in one device call and leaves the results as files.

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu_run --out OUT        (or: make bench-gpu OUT=OUT)
    PYTHONUNBUFFERED=1 python -m benchmarks.gpu_run --out OUT --quick [--phases a,b]     (a retry, <= 150 s)

Installs nothing. With CUDA it runs the real shapes (at most ``--budget`` seconds, 360 by default, counted from
the start; the phases in the order of their value, so a short budget cuts the least valuable);
without CUDA the same phases run at tiny shapes on the CPU, the Triton kernels through the interpreter, as a
smoke test. Every phase runs in its own (forked) process group under its own time budget (cut to what is left of
the total): one that fails, hangs or runs out of time is reported and killed, the others go on, and what it
recorded before stopping is kept. Under OUT: ``results.json`` (every number), ``RESULTS.md`` (a section for
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

STARTED = time.monotonic()  # the budget counts from here, before torch is imported

from benchmarks.gpu_run.checks import (_check_accuracy, _check_env, _check_kernels, _check_max_batch,  # noqa: E402
                                      _check_memory, _check_options, _check_profile, _check_sampling,
                                      _check_tests, _compile_failed, _missing_impls)
from benchmarks.gpu_run.measure import SCALES, TRAIN_IMPLS as TRAIN, quick  # noqa: E402

REPORT_RESERVE_S = 8.0  # kept back from the total budget for the report
GRACE_S = 5.0  # a phase process gets this long past its budget before it is killed


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    gpu_s: float  # budget on the GPU, seconds
    quick_s: float  # budget on the GPU under --quick (0: not run then)
    cpu_s: float  # budget of the CPU smoke run
    check: Callable
    needed: Callable = lambda results: True


# Budgets: GPU, GPU --quick, CPU smoke; upper bounds (most phases end sooner), the total capped by --budget
# (default 360 s of phases, 150 s under --quick; with the install, imports and plots the command stays within
# 420 s, leaving a 600 s device call room for nothing else, and a 15-minute lending room for one retry).
# The order is the order of value: what the total budget cuts first is at the end. (CPU smoke budgets leave
# room for Triton 3.6's interpreter, ~1.4x slower than 3.9's on memory_vs_k and profile.) train_cifar is the first
# phase to compile the Triton kernels at real shapes (tens of seconds).
PHASES = (
    Phase("env", 10, 10, 15, _check_env),
    Phase("tests", 45, 25, 20, _check_tests),
    Phase("train_cifar", 60, 40, 15, _missing_impls(lambda a: TRAIN + (("rosinality",) if a.rosinality else ()))),
    Phase("train_cifar_compiled", 75, 0, 15, _missing_impls(lambda a: ("compiled",))),
    Phase("train_cifar_compiled_per_flow", 45, 0, 15, _missing_impls(lambda a: ("compiled-per-flow",)),
          needed=_compile_failed),
    Phase("kernels", 25, 20, 12, _check_kernels),
    Phase("sampling", 20, 15, 12, _check_sampling),
    Phase("memory_vs_k", 35, 25, 20, _check_memory),
    Phase("max_batch", 40, 0, 15, _check_max_batch),
    Phase("train_celeba", 35, 0, 15, _missing_impls(lambda a: TRAIN)),
    Phase("accuracy", 20, 0, 15, _check_accuracy),
    Phase("gpu_options", 25, 0, 15, _check_options),
    Phase("profile", 15, 0, 18, _check_profile),
)
SUCCESS = ("ok", "not needed", "not run")  # a phase's statuses that leave the exit status 0
DEFAULT_BUDGET_S = 360.0
QUICK_BUDGET_S = 150.0


def phase_budget(phase: Phase, scale_name: str, quick: bool) -> float:
    """The phase's own budget in seconds at this scale (0: the phase is not part of a --quick run)."""
    if scale_name != "gpu":
        return phase.cpu_s
    return phase.quick_s if quick else phase.gpu_s


# ----------------------------------------------------------------------------------------------
# Running the phases
# ----------------------------------------------------------------------------------------------
def run_phase(phase: Phase, args, scale_name: str, seconds: float) -> dict:
    """Run one phase in a forked child, in its own process group, for at most ``seconds`` (+ grace), then kill
    the group (pytest, compile workers): -> the phase's record. The child starts with torch, Triton and the
    phases already imported here (seconds saved per phase); CUDA is never initialised here, each child does that
    itself (CUDA does not survive a fork)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the runner process: a forked phase could not use it")
    out = Path(args.out)
    json_path, log_path = out / f"phase_{phase.name}.json", out / "logs" / f"{phase.name}.log"
    json_path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _phase_child(phase.name, scale_name, out, seconds, args, log_path)
    code = _wait(pid, seconds + GRACE_S)
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    message = ("" if status == "ok" else f"stopped after {seconds:.0f} s budget" if status == "timeout"
               else _last_error(log_path))
    return dict(status=status, seconds=round(time.monotonic() - t0, 1), budget_s=round(seconds, 1),
                message=message, data=data)


def _wait(pid: int, seconds: float) -> int | None:
    """Exit code of the child ``pid``, or None if it had to be killed after ``seconds``. Its process group is
    killed either way (nothing it started outlives it)."""
    deadline = time.monotonic() + seconds
    code = None
    while code is None and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
        else:
            time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if code is None:
        os.waitpid(pid, 0)
    return code


def _phase_child(name: str, scale_name: str, out: Path, seconds: float, args, log_path: Path):
    """The forked child: a new process group, stdout and stderr to the phase's log, run, exit (never returns)."""
    code = 1
    try:
        os.setsid()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        code = run_phase_here(name, scale_name, out, seconds, args.rosinality, args.quick)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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


def run_all(args, command: str = "", started: float = STARTED) -> dict:
    """Every phase in order, each cut to what is left of ``args.budget`` counted from ``started`` (the process
    start); after each phase results.json and RESULTS.md are rewritten, so a run killed from outside keeps what
    it finished."""
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = started + args.budget
    results: dict = {}
    scale_name = args.scale
    for phase in PHASES:
        if args.phases and phase.name not in args.phases and phase.name != "env":
            continue
        budget = phase_budget(phase, scale_name, args.quick)
        seconds = min(budget, deadline - time.monotonic() - REPORT_RESERVE_S - GRACE_S)
        if not phase.needed(results):
            results[phase.name] = dict(status="not needed", seconds=0, message="torch.compile(reference) measured")
        elif budget <= 0:
            results[phase.name] = dict(status="not run", seconds=0, budget_s=0, message="not part of --quick")
        elif seconds < 5:
            results[phase.name] = dict(status="skipped", seconds=0, budget_s=budget,
                                       message=f"skipped: the total budget of {args.budget:.0f} s ran out")
        else:
            try:
                record = run_phase(phase, args, scale_name, seconds)
                if phase.name == "env":
                    scale_name = _settle_scale(scale_name, record)
            except Exception as err:  # the runner's own failure: reported, the next phases still run
                traceback.print_exc()
                record = dict(status="failed", seconds=0, message=f"runner: {type(err).__name__}: {err}", data={})
            scale = SCALES.get(scale_name, SCALES["cpu"])  # ("auto" only if the env phase itself broke)
            scale = quick(scale) if args.quick else scale
            results[phase.name] = judge(phase, record, dataclasses.asdict(scale), args)
        _print_progress(phase.name, results[phase.name])
        write_results(results, args, command)
    return results


def _settle_scale(requested: str, env_record: dict) -> str:
    """After the env phase: the scale of every other phase, and the imports its children start with (Triton
    through its interpreter on a CPU: decided before triton is first imported)."""
    scale = requested if requested != "auto" else ("gpu" if env_record["data"].get("cuda", _cuda_available())
                                                   else "cpu")
    env_record["data"]["scale"] = scale
    if scale == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastglow.backends.triton  # noqa: F401  (triton and the kernels)
    from benchmarks.gpu_run import phases as gpu_phases  # noqa: F401
    return scale


def _cuda_available() -> bool:
    """Asked of a fresh interpreter: asking torch here would initialise CUDA, which a fork does not survive."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() == "True"


def _print_progress(name: str, record: dict) -> None:
    """One line per phase as it ends; after env, the device line and the versions."""
    print(f"[{name}] {record['status']} in {record.get('seconds', 0):.1f} s"
          + (f": {record['message']}" if record.get("message") else ""), flush=True)
    if name == "env":
        env = record.get("data", {})
        print(f"device: {env.get('device')}\nversions: python {env.get('python')}, torch {env.get('torch')}, "
              f"triton {env.get('triton')}, numpy {env.get('numpy')}, fastglow {env.get('fastglow')}; "
              f"commit {env.get('git_commit')}", flush=True)


def write_results(results: dict, args, command: str) -> None:
    """results.json first (it needs nothing but json), then RESULTS.md; a report that cannot be written costs
    only itself (gpu_report guards each section too)."""
    from benchmarks.gpu_run import report as gpu_report
    out = Path(args.out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(dict(command=command, budget_s=args.budget, quick=args.quick, phases=results),
                              indent=1, default=str))
    os.replace(tmp, out / "results.json")
    try:
        (out / "RESULTS.md").write_text(gpu_report.markdown(results, command) + "\n")
    except Exception as err:  # noqa: BLE001  (never lose the run for its report)
        print(f"RESULTS.md not written: {type(err).__name__}: {err}", flush=True)


def write_outputs(results: dict, args, command: str) -> None:
    """The final files: results.json and RESULTS.md again, the plots, and the summary on stdout."""
    from benchmarks.gpu_run import report as gpu_report
    out = Path(args.out)
    write_results(results, args, command)
    try:
        written = gpu_report.plots(results, out)
    except Exception as err:  # a plotting problem must not lose the numbers already written
        written = [f"(plots failed: {err})"]
    try:
        print("\n" + gpu_report.summary(results))
    except Exception as err:  # noqa: BLE001
        print(f"\n(summary failed: {type(err).__name__}: {err}; the numbers are in results.json)")
    print(f"\nwritten under {out}: results.json, RESULTS.md, {', '.join(written)}, phase_*.json, logs/")
    print(f"wall time since the start: {time.monotonic() - STARTED:.0f} s (budget {args.budget:.0f} s of phases)")


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def run_phase_here(name: str, scale_name: str, out: Path, seconds: float, rosinality, quick_run=False) -> int:
    """Run one phase in this process, recording into phase_<name>.json as it goes: -> exit code."""
    import torch

    from benchmarks.gpu_run import phases as gpu_phases
    scale = scale_name if scale_name != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if scale == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (a fork inherits the parent's triton, already set so)
        torch.set_num_threads(1)  # 2 cores shared with other jobs: oversubscribed threads cost 100x
    rec = gpu_phases.Recorder(out / f"phase_{name}.json")
    ctx = gpu_phases.PhaseContext(quick(SCALES[scale]) if quick_run else SCALES[scale], rec,
                                  time.monotonic() + seconds - 2, out, rosinality)
    try:
        getattr(gpu_phases, f"phase_{name}")(ctx)
    except Exception:
        traceback.print_exc()
        rec.set("error", traceback.format_exc(limit=3).strip().splitlines()[-1])
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    p.add_argument("--budget", type=float, help=f"total seconds for all phases, counted from the start (default "
                   f"{DEFAULT_BUDGET_S:.0f}; {QUICK_BUDGET_S:.0f} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a retry: fewer phases and timed steps, float32 tests only (with --phases: those only)")
    p.add_argument("--scale", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: real shapes with CUDA, tiny shapes without")
    p.add_argument("--phases", type=lambda s: s.split(","), help="run only these phases (comma-separated)")
    p.add_argument("--rosinality", help="folder holding rosinality/glow-pytorch's model.py: another baseline")
    p.add_argument("--phase", help="run only this phase, in this process, and write only its JSON (debugging)")
    p.add_argument("--phase-seconds", type=float, default=120.0, help="--phase's budget (default 120)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget is None:
        args.budget = QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S
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
    if args.phase:  # one phase in this process (debugging)
        return run_phase_here(args.phase, args.scale, Path(args.out), args.phase_seconds, args.rosinality,
                              args.quick)
    command = "python -m benchmarks.gpu_run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_all(args, command)
    write_outputs(results, args, command)
    return 0 if all(r["status"] in SUCCESS for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
