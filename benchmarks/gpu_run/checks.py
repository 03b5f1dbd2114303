"""What each phase of the GPU run must produce, checked from its JSON: a phase that "ran" but measured
nothing fails. Each check: (phase data, scale as a dict, args) -> list of problems."""

from __future__ import annotations

from typing import Callable

from benchmarks.gpu_run.measure import TRAIN_IMPLS as TRAIN


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


def _check_profile(d, scale, args):
    return [f"{i}: {d.get('impls', {}).get(i, {}).get('status', 'no profile')}"
            for i in ("fastglow-reversible", "eager") if not d.get("impls", {}).get(i, {}).get("top")]


def _compile_failed(results) -> bool:
    return results.get("train_cifar_compiled", {}).get("status") != "ok"
