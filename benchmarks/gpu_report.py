"""What the one-command GPU run (:mod:`benchmarks.gpu_run`) leaves behind: the targets of issue #11 judged from
the phases' numbers, a RESULTS.md section, PNG plots, and the one-screen summary."""

from __future__ import annotations

from pathlib import Path

FASTGLOW = "fastglow-reversible"


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
    """(target, measured value, met | missed | n/a) for every target of issue #11."""
    eager, fg = _impl(results, "train_cifar", "eager"), _impl(results, "train_cifar", FASTGLOW)
    compiled = (_impl(results, "train_cifar_compiled", "compiled")
                or _impl(results, "train_cifar_compiled_per_flow", "compiled-per-flow"))
    ckpt = _impl(results, "train_cifar", "checkpoint")
    ms = lambda a, b: f"{b['ms']:.1f} vs {a['ms']:.1f} ms"  # noqa: E731
    rows = [_ratio_target("CIFAR training step >= 2.0x reference eager fp32", eager, fg, "ms", 2.0,
                          lambda a, b: ms(b, a)),
            _ratio_target("CIFAR training step >= 1.3x torch.compile(reference)", compiled, fg, "ms", 1.3,
                          lambda a, b: ms(b, a))]
    if ckpt and fg:
        ok = fg["ms"] < ckpt["ms"] and fg["peak_gb"] < ckpt["peak_gb"]
        rows.append(("faster than per-Flow checkpoint at lower peak memory",
                     f"{fg['ms']:.1f} vs {ckpt['ms']:.1f} ms, {fg['peak_gb']:.2f} vs {ckpt['peak_gb']:.2f} GB",
                     "met" if ok else "missed"))
    else:
        rows.append(("faster than per-Flow checkpoint at lower peak memory", "n/a", "n/a"))
    return rows + [_bandwidth_target(results), _memory_target(results), _batch_target(results),
                   _sampling_target(results), _roundtrip_check(results)]


def _bandwidth_target(results):
    name = "fused kernels >= 80% of copy bandwidth at 256^2"
    rows = [r for r in results.get("kernels", {}).get("data", {}).get("rows", []) if r["fused"] and "of_copy" in r]
    if not rows:
        return name, "n/a", "n/a"
    worst = min(rows, key=lambda r: r["of_copy"])
    return (name, f"worst {100 * worst['of_copy']:.0f}% ({worst['kernel']} {tuple(worst['shape'])})",
            "met" if worst["of_copy"] >= 0.8 else "missed")


def _memory_target(results):
    name = "peak memory at K=32 <= 1/5 of eager"
    rows = results.get("memory_vs_k", {}).get("data", {}).get("rows", [])
    at = {r["impl"]: r for r in rows if r["n_flow"] == 32 and r.get("status") == "ok"}
    if FASTGLOW not in at or "eager" not in at:
        return name, "n/a", "n/a"
    ratio = at[FASTGLOW]["peak_gb"] / at["eager"]["peak_gb"]
    return (name, f"1/{1 / ratio:.1f} ({at[FASTGLOW]['peak_gb']:.2f} vs {at['eager']['peak_gb']:.2f} GB)",
            "met" if ratio <= 0.2 else "missed")


def _batch_target(results):
    name = "K=32 L=6 256^2 trains at batch >= 64 in 80 GB"
    rows = [r for r in results.get("max_batch", {}).get("data", {}).get("rows", [])
            if r["impl"] == FASTGLOW and r["limit_gb"] == 80.0]
    if not rows:
        return name, "n/a", "n/a"
    r = rows[0]
    more = "+ (search capped)" if r["capped"] else ""
    return name, f"batch {r['largest_ok']}{more}", "met" if r["largest_ok"] >= 64 else "missed"


def _sampling_target(results):
    data = results.get("sampling", {}).get("data", {})
    for shape, impls in data.items():
        if isinstance(impls, dict) and FASTGLOW in impls and "eager" in impls:
            ratio = impls[FASTGLOW]["images_per_s"] / impls["eager"]["images_per_s"]
            return ("sampling >= 2x eager (T=0.7)",
                    f"{ratio:.2f}x at {shape} ({impls[FASTGLOW]['images_per_s']:.0f} vs "
                    f"{impls['eager']['images_per_s']:.0f} images/s)", "met" if ratio >= 2 else "missed")
    return "sampling >= 2x eager (T=0.7)", "n/a", "n/a"


def _roundtrip_check(results):
    name = "check: reverse(forward(x)) float32 <= 1e-5 (fastglow)"
    rows = [r for r in results.get("accuracy", {}).get("data", {}).get("roundtrip", [])
            if r["impl"] == FASTGLOW and r["dtype"] == "float32"]
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
    d = {name: r.get("data", {}) for name, r in results.items()}
    lines = []
    for title, data in _training(d).items():
        if data.get("impls"):
            lines += [f"### Training step, {title} ({_shape_label(data.get('shape', {}))})", ""] + _train_table(data)
    if d.get("kernels", {}).get("rows"):
        k = d["kernels"]
        lines += [f"### Kernels (copy bandwidth, large: {k.get('copy_gbps_large', 0):.0f} GB/s)", ""]
        lines += _table(["kernel", "shape", "ms", "GB/s", "of copy", "predicted ms"],
                        [[r["kernel"], "x".join(map(str, r["shape"])), r["ms"], r.get("gbps"), r.get("of_copy"),
                          r.get("predicted_ms") if r.get("predicted_ms") is not None else "n/a"]
                         for r in k["rows"]])
    if d.get("memory_vs_k", {}).get("rows"):
        rows = d["memory_vs_k"]["rows"]
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        by = {(r["impl"], r["n_flow"]): r for r in rows}
        lines += ["### Peak memory (GB) of a training step vs K, CIFAR shape", ""]
        lines += _table(["K", *impls], [[k, *[_peak(by.get((i, k))) for i in impls]]
                                       for k in sorted({r["n_flow"] for r in rows})])
    if d.get("max_batch", {}).get("rows"):
        lines += [f"### Largest training batch ({_shape_label(d['max_batch'].get('shape', {}))})", ""]
        lines += _table(["implementation", "limit GB", "largest ok", "smallest failed", "capped", "trials"],
                        [[r["impl"], r["limit_gb"], r["largest_ok"], r["smallest_failed"], r["capped"],
                          len(r["trials"])] for r in d["max_batch"]["rows"]])
    lines += _small_sections(d)
    return lines


def _small_sections(d: dict) -> list[str]:
    lines = []
    samp = {k: v for k, v in d.get("sampling", {}).items() if isinstance(v, dict)}
    if samp:
        lines += [f"### Sampling at T={d['sampling'].get('temperature')}", ""]
        lines += _table(["shape", "implementation", "batch", "ms", "images/s"],
                        [[s, i, r["batch"], r["ms"], r["images_per_s"]] for s, v in samp.items() for i, r in v.items()])
    acc = d.get("accuracy", {})
    if acc.get("roundtrip"):
        lines += ["### reverse(forward(x)) on the device", ""]
        lines += _table(["implementation", "shape", "dtype", "normwise rel. error", "max rel. error"],
                        [[r["impl"], r["shape"], r["dtype"], r["rel_error"], r["max_rel_error"]]
                         for r in acc["roundtrip"]])
    if acc.get("vs_reference"):
        shape = _shape_label(acc["vs_reference"][0]["shape"])
        lines += [f"### fastglow (Triton, reversible) vs the reference, same weights ({shape})", ""]
        lines += _table(["dtype", "log_p", "logdet", "worst parameter gradient"],
                        [[r["dtype"], r["log_p"], r["logdet"], r["grads_max"]] for r in acc["vs_reference"]])
    opts = d.get("gpu_options", {}).get("variants", {})
    if opts:
        base = opts.get("float32", {}).get("ms")
        lines += ["### GPU-side options, fastglow-reversible at the CIFAR shape", ""]
        lines += _table(["variant", "median ms", "vs float32", "loss", "peak GB", "captured", "status"],
                        [[n, r.get("ms"), base / r["ms"] if base and r.get("ms") else None, r.get("loss"),
                          r.get("peak_gb"), r.get("captured"), r.get("status")] for n, r in opts.items()])
    for impl, r in d.get("profile", {}).get("impls", {}).items():
        if r.get("top"):
            lines += [f"### Profile of two CIFAR training steps, {impl} (top rows by {r['sorted_by']}; the full "
                      f"table: {r['file']})", ""]
            lines += _table(["op or kernel", "ms", "calls"], [[t["name"], t["ms"], t["calls"]] for t in r["top"]])
    return lines


def _peak(r):
    return None if r is None else (r["peak_gb"] if r.get("status") == "ok" else r.get("status"))


def _shape_label(shape: dict) -> str:
    if not shape:
        return "?"
    return (f"{shape['in_channel']}x{shape['img_size']}x{shape['img_size']}, K={shape['n_flow']}, "
            f"L={shape['n_block']}, width {shape['hidden']}, {'affine' if shape['affine'] else 'additive'}, "
            f"batch {shape['batch']}")


def markdown(results: dict, command: str) -> str:
    env = results.get("env", {}).get("data", {})
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
                    [[n, r["status"], r.get("seconds"), r.get("budget_s"), r.get("message", "")]
                     for n, r in results.items()])
    return "\n".join(lines + _phase_sections(results))


# ----------------------------------------------------------------------------------------------
# Plots and the summary
# ----------------------------------------------------------------------------------------------
def plots(results: dict, out: Path) -> list[str]:
    """PNG plots of what was measured; -> the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    d = {name: r.get("data", {}) for name, r in results.items()}
    trains = [(title, data["impls"]) for title, data in _training(d).items() if data.get("impls")]
    if trains:
        fig, axes = plt.subplots(1, len(trains), figsize=(5 * len(trains), 3.5), squeeze=False)
        for ax, (phase, impls) in zip(axes[0], trains):
            ok = {i: r for i, r in impls.items() if r.get("status") == "ok"}
            ax.barh(list(ok), [r["ms"] for r in ok.values()])
            ax.set_title(phase)
            ax.set_xlabel("median training step (ms)")
        written.append(_save(fig, out / "train_step.png"))
    rows = d.get("memory_vs_k", {}).get("rows", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["n_flow"], r["peak_gb"]) for r in rows if r["impl"] == impl and r.get("status") == "ok"]
            ax.plot([k for k, _ in pts], [g for _, g in pts], marker="o", label=impl)
        ax.set(xlabel="K (flow steps per level)", ylabel="peak memory (GB)", title="training step, CIFAR shape")
        ax.legend()
        written.append(_save(fig, out / "memory_vs_k.png"))
    kern = [r for r in d.get("kernels", {}).get("rows", []) if "of_copy" in r]
    if kern:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(kern) + 1.5))
        ax.barh([f"{r['kernel']} {'x'.join(map(str, r['shape']))}" for r in kern], [r["of_copy"] for r in kern])
        ax.axvline(0.8, color="k", linestyle="--")
        ax.set_xlabel("achieved bandwidth / copy bandwidth at the same shape")
        written.append(_save(fig, out / "kernels.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def summary(results: dict) -> str:
    """One screen: the device, each phase's status, each target with its measured value and verdict."""
    env = results.get("env", {}).get("data", {})
    lines = [f"device: {env.get('device', '?')}",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('git_commit')}"]
    if env.get("scale") == "cpu":
        lines.append("CPU SMOKE RUN at tiny shapes: the verdicts below say nothing about the GPU targets")
    lines += ["", f"{'phase':32s} {'status':10s} {'s':>6s}  message"]
    lines += [f"{n:32s} {r['status']:10s} {r.get('seconds') or 0:6.1f}  {r.get('message', '')[:60]}"
              for n, r in results.items()]
    lines += ["", f"{'target':55s} {'verdict':7s} measured"]
    lines += [f"{t:55s} {v:7s} {m}" for t, m, v in targets(results)]
    return "\n".join(lines)
