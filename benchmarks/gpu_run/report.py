"""What the one-command GPU run (:mod:`benchmarks.gpu_run`) leaves behind: the targets judged from the phases'
numbers, a RESULTS.md section, PNG plots, and the one-screen summary. Every target row and every section is
written on its own (:func:`_guarded`): a phase that failed, timed out or recorded only some of its fields costs
its own rows, never another phase's numbers."""

from __future__ import annotations

import functools
from pathlib import Path

FASTGLOW = "fastglow-reversible"


def _guarded(fallback):
    """Decorator: on any error, ``fallback(fn, err)`` instead of the result (one section or row lost, not all)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001  (a report must outlive any malformed record)
                return fallback(fn, f"{type(err).__name__}: {err}")
        return run
    return wrap


def _target(name: str):
    """A target row's function, guarded: an unreadable record gives (name, 'unreadable: ...', 'n/a')."""
    return _guarded(lambda fn, err: (name, f"unreadable record ({err})", "n/a"))


_section = _guarded(lambda fn, err: [f"(section {fn.__name__.strip('_')} not written: {err}; "
                                     "its numbers are in results.json)", ""])


def _impl(results, phase, impl):
    """A measured implementation of a training phase, or None."""
    r = results.get(phase, {}).get("data", {}).get("impls", {}).get(impl)
    return r if r and r.get("status") == "ok" else None


def _ratio_target(name, num, den, key, goal, label):
    """num/den of ``key`` against ``goal``: -> (name, measured, verdict)."""
    if not (num and den):
        return name, "n/a", "n/a"
    ratio = num[key] / den[key]
    return name, f"{ratio:.2f}x ({label(num, den)})", "met" if ratio >= goal else "missed"


def targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured value, met | missed | n/a) for every target."""
    return [row(results) for row in (_eager_target, _compiled_target, _checkpoint_target, _bandwidth_target,
                                     _memory_target, _batch_target, _sampling_target, _roundtrip_check)]


def _ms(a, b):
    return f"{a['ms']:.1f} vs {b['ms']:.1f} ms"


@_target("CIFAR training step >= 2.0x reference eager fp32")
def _eager_target(results):
    eager, fg = _impl(results, "train_cifar", "eager"), _impl(results, "train_cifar", FASTGLOW)
    return _ratio_target("CIFAR training step >= 2.0x reference eager fp32", eager, fg, "ms", 2.0,
                         lambda a, b: _ms(b, a))


@_target("CIFAR training step >= 1.3x torch.compile(reference)")
def _compiled_target(results):
    compiled = (_impl(results, "train_cifar_compiled", "compiled")
                or _impl(results, "train_cifar_compiled_per_flow", "compiled-per-flow"))
    return _ratio_target("CIFAR training step >= 1.3x torch.compile(reference)", compiled,
                         _impl(results, "train_cifar", FASTGLOW), "ms", 1.3, lambda a, b: _ms(b, a))


@_target("faster than per-Flow checkpoint at lower peak memory")
def _checkpoint_target(results):
    name = "faster than per-Flow checkpoint at lower peak memory"
    ckpt, fg = _impl(results, "train_cifar", "checkpoint"), _impl(results, "train_cifar", FASTGLOW)
    if not (ckpt and fg):
        return name, "n/a", "n/a"
    ok = fg["ms"] < ckpt["ms"] and fg["peak_gb"] < ckpt["peak_gb"]
    return (name, f"{fg['ms']:.1f} vs {ckpt['ms']:.1f} ms, {fg['peak_gb']:.2f} vs {ckpt['peak_gb']:.2f} GB",
            "met" if ok else "missed")


@_target("fused kernels >= 80% of copy bandwidth at 256^2")
def _bandwidth_target(results):
    name = "fused kernels >= 80% of copy bandwidth at 256^2"
    rows = [r for r in results.get("kernels", {}).get("data", {}).get("rows", []) if r.get("fused") and r.get("of_copy") is not None]
    if not rows:
        return name, "n/a", "n/a"
    worst = min(rows, key=lambda r: r["of_copy"])
    return (name, f"worst {100 * worst['of_copy']:.0f}% ({worst['kernel']} {tuple(worst['shape'])})",
            "met" if worst["of_copy"] >= 0.8 else "missed")


@_target("peak memory at K=32 <= 1/5 of eager")
def _memory_target(results):
    name = "peak memory at K=32 <= 1/5 of eager"
    rows = results.get("memory_vs_k", {}).get("data", {}).get("rows", [])
    at = {r.get("impl"): r for r in rows if r.get("n_flow") == 32 and r.get("status") == "ok" and r.get("peak_gb")}
    if FASTGLOW not in at or "eager" not in at:
        return name, "n/a", "n/a"
    ratio = at[FASTGLOW]["peak_gb"] / at["eager"]["peak_gb"]
    return (name, f"1/{1 / ratio:.1f} ({at[FASTGLOW]['peak_gb']:.2f} vs {at['eager']['peak_gb']:.2f} GB)",
            "met" if ratio <= 0.2 else "missed")


@_target("K=32 L=6 256^2 trains at batch >= 64 in 80 GB")
def _batch_target(results):
    name = "K=32 L=6 256^2 trains at batch >= 64 in 80 GB"
    rows = [r for r in results.get("max_batch", {}).get("data", {}).get("rows", [])
            if r.get("impl") == FASTGLOW and r.get("limit_gb") == 80.0 and "largest_ok" in r]
    if not rows:
        return name, "n/a", "n/a"
    r = rows[0]
    more = "+ (search capped)" if r.get("capped") else ""
    return name, f"batch {r['largest_ok']}{more}", "met" if r["largest_ok"] >= 64 else "missed"


@_target("sampling >= 2x eager (T=0.7)")
def _sampling_target(results):
    data = results.get("sampling", {}).get("data", {})
    for shape, impls in data.items():
        if isinstance(impls, dict) and all(impls.get(i, {}).get("images_per_s") for i in (FASTGLOW, "eager")):
            ratio = impls[FASTGLOW]["images_per_s"] / impls["eager"]["images_per_s"]
            return ("sampling >= 2x eager (T=0.7)",
                    f"{ratio:.2f}x at {shape} ({impls[FASTGLOW]['images_per_s']:.0f} vs "
                    f"{impls['eager']['images_per_s']:.0f} images/s)", "met" if ratio >= 2 else "missed")
    return "sampling >= 2x eager (T=0.7)", "n/a", "n/a"


@_target("check: reverse(forward(x)) float32 <= 1e-5 (fastglow)")
def _roundtrip_check(results):
    name = "check: reverse(forward(x)) float32 <= 1e-5 (fastglow)"
    rows = [r for r in results.get("accuracy", {}).get("data", {}).get("roundtrip", [])
            if r.get("impl") == FASTGLOW and r.get("dtype") == "float32" and r.get("rel_error") is not None]
    if not rows:
        return name, "n/a", "n/a"
    worst = max(r["rel_error"] for r in rows)
    return name, f"{worst:.1e} (normwise, worst shape)", "met" if worst <= 1e-5 else "missed"


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows] + [""])


def _train_table(data: dict) -> list[str]:
    impls = data.get("impls", {})
    eager = impls.get("eager", {}).get("ms")
    rows = [[impl, r.get("ms"), (eager / r["ms"]) if eager and r.get("ms") else None, r.get("peak_gb"),
             r.get("first_s"), r.get("first_loss"), r.get("status")] for impl, r in impls.items()]
    return _table(["implementation", "median ms", "speed-up vs eager", "peak GB", "first step s",
                   "first loss (bits/dim)", "status"], rows)


def _training(d: dict) -> dict:
    """{title: {"shape": ..., "impls": ...}}: the CIFAR phases (plain, compiled, per-Flow compiled) as one."""
    cifar = {"shape": d.get("train_cifar", {}).get("shape", {}), "impls": {}}
    for phase in ("train_cifar", "train_cifar_compiled", "train_cifar_compiled_per_flow"):
        cifar["impls"].update(d.get(phase, {}).get("impls", {}))
        cifar["shape"] = cifar["shape"] or d.get(phase, {}).get("shape", {})
    return {"CIFAR shape": cifar, "CelebA-HQ shape": d.get("train_celeba", {})}


def _phase_sections(results: dict) -> list[str]:
    """Every phase's section, each written on its own; a row lacking a field shows it blank."""
    d = {name: (r.get("data") or {}) for name, r in results.items()}
    return [line for section in (_training_sections, _kernels_section, _memory_section, _batch_section,
                                 _sampling_section, _roundtrip_section, _reference_section, _options_section,
                                 _profile_sections)
            for line in section(d)]


@_section
def _training_sections(d: dict) -> list[str]:
    lines = []
    for title, data in _training(d).items():
        if data.get("impls"):
            lines += [f"### Training step, {title} ({_shape_label(data.get('shape', {}))})", ""] + _train_table(data)
    return lines


@_section
def _kernels_section(d: dict) -> list[str]:
    k = d.get("kernels", {})
    if not k.get("rows"):
        return []
    return ([f"### Kernels (copy bandwidth, large: {k.get('copy_gbps_large') or 0:.0f} GB/s)", ""]
            + _table(["kernel", "shape", "ms", "GB/s", "of copy", "predicted ms", "status"],
                     [[r.get("kernel"), "x".join(map(str, r.get("shape", ()))), r.get("ms"), r.get("gbps"),
                       r.get("of_copy"), r.get("predicted_ms") if r.get("predicted_ms") is not None else "n/a",
                       r.get("status", "ok")] for r in k["rows"]]))


@_section
def _memory_section(d: dict) -> list[str]:
    rows = d.get("memory_vs_k", {}).get("rows", [])
    if not rows:
        return []
    impls = list(dict.fromkeys(r.get("impl") for r in rows))
    by = {(r.get("impl"), r.get("n_flow")): r for r in rows}
    return (["### Peak memory (GB) of a training step vs K, CIFAR shape", ""]
            + _table(["K", *impls], [[k, *[_peak(by.get((i, k))) for i in impls]]
                                    for k in sorted({r["n_flow"] for r in rows if r.get("n_flow") is not None})]))


@_section
def _batch_section(d: dict) -> list[str]:
    rows = d.get("max_batch", {}).get("rows", [])
    if not rows:
        return []
    return ([f"### Largest training batch ({_shape_label(d['max_batch'].get('shape', {}))})", ""]
            + _table(["implementation", "limit GB", "largest ok", "smallest failed", "capped", "trials"],
                     [[r.get("impl"), r.get("limit_gb"), r.get("largest_ok"), r.get("smallest_failed"),
                       r.get("capped"), len(r.get("trials", []))] for r in rows]))


@_section
def _sampling_section(d: dict) -> list[str]:
    samp = {k: v for k, v in d.get("sampling", {}).items() if isinstance(v, dict)}
    if not samp:
        return []
    return ([f"### Sampling at T={d['sampling'].get('temperature')}", ""]
            + _table(["shape", "implementation", "batch", "ms", "images/s", "status"],
                     [[s, i, r.get("batch"), r.get("ms"), r.get("images_per_s"), r.get("status", "ok")]
                      for s, v in samp.items() for i, r in v.items()]))


@_section
def _roundtrip_section(d: dict) -> list[str]:
    rows = d.get("accuracy", {}).get("roundtrip", [])
    if not rows:
        return []
    return (["### reverse(forward(x)) on the device", ""]
            + _table(["implementation", "shape", "dtype", "normwise rel. error", "max rel. error", "status"],
                     [[r.get("impl"), r.get("shape"), r.get("dtype"), r.get("rel_error"), r.get("max_rel_error"),
                       r.get("status", "ok")] for r in rows]))


@_section
def _reference_section(d: dict) -> list[str]:
    rows = d.get("accuracy", {}).get("vs_reference", [])
    if not rows:
        return []
    shape = next((_shape_label(r["shape"]) for r in rows if r.get("shape")), "?")
    return ([f"### fastglow (Triton, reversible) vs the reference, same weights ({shape})", ""]
            + _table(["dtype", "log_p", "logdet", "worst parameter gradient", "status"],
                     [[r.get("dtype"), r.get("log_p"), r.get("logdet"), r.get("grads_max"), r.get("status", "ok")]
                      for r in rows]))


@_section
def _options_section(d: dict) -> list[str]:
    opts = d.get("gpu_options", {}).get("variants", {})
    if not opts:
        return []
    base = opts.get("float32", {}).get("ms")
    return (["### GPU-side options, fastglow-reversible at the CIFAR shape", ""]
            + _table(["variant", "median ms", "vs float32", "loss", "peak GB", "captured", "status"],
                     [[n, r.get("ms"), base / r["ms"] if base and r.get("ms") else None, r.get("loss"),
                       r.get("peak_gb"), r.get("captured"), r.get("status")] for n, r in opts.items()]))


@_section
def _profile_sections(d: dict) -> list[str]:
    lines = []
    for impl, r in d.get("profile", {}).get("impls", {}).items():
        if r.get("top"):
            lines += [f"### Profile of two CIFAR training steps, {impl} (top rows by {r.get('sorted_by')}; the "
                      f"full table: {r.get('file')})", ""]
            lines += _table(["op or kernel", "ms", "calls"],
                            [[t.get("name"), t.get("ms"), t.get("calls")] for t in r["top"]])
    return lines


def _peak(r):
    return None if r is None else (r.get("peak_gb") if r.get("status") == "ok" else r.get("status"))


def _shape_label(shape: dict) -> str:
    if not shape:
        return "?"
    return (f"{shape['in_channel']}x{shape['img_size']}x{shape['img_size']}, K={shape['n_flow']}, "
            f"L={shape['n_block']}, width {shape['hidden']}, {'affine' if shape['affine'] else 'additive'}, "
            f"batch {shape['batch']}")


def markdown(results: dict, command: str) -> str:
    env = results.get("env", {}).get("data") or {}
    smoke = env.get("scale") == "cpu"
    lines = [f"## GPU run{' (CPU smoke, tiny shapes: checks the plumbing, not the targets)' if smoke else ''}: "
             f"{env.get('date', '?')}", "",
             f"- device: {env.get('device', '?')}",
             f"- versions: torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}; "
             f"commit {env.get('git_commit')}",
             f"- command: `{command}`", "",
             "### Targets", ""]
    lines += _table(["target", "measured", "verdict"], [list(t) for t in targets(results)])
    lines += ["### Phases", ""]
    lines += _table(["phase", "status", "seconds", "budget s", "message"],
                    [[n, r.get("status"), r.get("seconds"), r.get("budget_s"), r.get("message", "")]
                     for n, r in results.items()])
    return "\n".join(lines + _phase_sections(results))


# ----------------------------------------------------------------------------------------------
# Plots and the summary
# ----------------------------------------------------------------------------------------------
def plots(results: dict, out: Path) -> list[str]:
    """PNG plots of what was measured, each on its own; -> the files written (or why one was not)."""
    import matplotlib
    matplotlib.use("Agg")
    d = {name: (r.get("data") or {}) for name, r in results.items()}
    return [name for name in (plot(d, out) for plot in (_train_plot, _memory_plot, _kernels_plot)) if name]


_plot = _guarded(lambda fn, err: f"({fn.__name__.strip('_')} failed: {err})")


@_plot
def _train_plot(d: dict, out: Path) -> str | None:
    import matplotlib.pyplot as plt
    trains = [(title, data["impls"]) for title, data in _training(d).items() if data.get("impls")]
    if not trains:
        return None
    fig, axes = plt.subplots(1, len(trains), figsize=(5 * len(trains), 3.5), squeeze=False)
    for ax, (phase, impls) in zip(axes[0], trains):
        ok = {i: r for i, r in impls.items() if r.get("status") == "ok" and r.get("ms")}
        ax.barh(list(ok), [r["ms"] for r in ok.values()])
        ax.set_title(phase)
        ax.set_xlabel("median training step (ms)")
    return _save(fig, out / "train_step.png")


@_plot
def _memory_plot(d: dict, out: Path) -> str | None:
    import matplotlib.pyplot as plt
    rows = [r for r in d.get("memory_vs_k", {}).get("rows", []) if r.get("status") == "ok" and r.get("peak_gb")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["n_flow"], r["peak_gb"]) for r in rows if r["impl"] == impl)
        ax.plot([k for k, _ in pts], [g for _, g in pts], marker="o", label=impl)
    ax.set(xlabel="K (flow steps per level)", ylabel="peak memory (GB)", title="training step, CIFAR shape")
    ax.legend()
    return _save(fig, out / "memory_vs_k.png")


@_plot
def _kernels_plot(d: dict, out: Path) -> str | None:
    import matplotlib.pyplot as plt
    kern = [r for r in d.get("kernels", {}).get("rows", []) if r.get("of_copy") is not None]
    if not kern:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(kern) + 1.5))
    ax.barh([f"{r.get('kernel')} {'x'.join(map(str, r.get('shape', ())))}" for r in kern], [r["of_copy"] for r in kern])
    ax.axvline(0.8, color="k", linestyle="--")
    ax.set_xlabel("achieved bandwidth / copy bandwidth at the same shape")
    return _save(fig, out / "kernels.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def summary(results: dict) -> str:
    """One screen: the device, each phase's status, each target with its measured value and verdict."""
    env = results.get("env", {}).get("data") or {}
    lines = [f"device: {env.get('device', '?')}",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('git_commit')}"]
    if env.get("scale") == "cpu":
        lines.append("CPU SMOKE RUN at tiny shapes: the verdicts below say nothing about the GPU targets")
    lines += ["", f"{'phase':32s} {'status':10s} {'s':>6s}  message"]
    lines += [f"{n:32s} {r.get('status', '?'):10s} {r.get('seconds') or 0:6.1f}  {r.get('message', '')[:60]}"
              for n, r in results.items()]
    lines += ["", f"{'target':55s} {'verdict':7s} measured"]
    lines += [f"{t:55s} {v:7s} {m}" for t, m, v in targets(results)]
    return "\n".join(lines)
