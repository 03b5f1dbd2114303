"""The Glow paper's ablation (Kingma & Dhariwal 2018, Figure 3) on the embedded 8x8 digits: the permutation
between couplings (reverse = NICE, shuffle = RealNVP, 1x1 conv = Glow) x the coupling (additive, affine).

Every variant is trained by ``fastglow train`` itself (:func:`fastglow.app.loop.train`) with the same settings
and seeds; only ``--permutation`` and ``--additive``/``--affine`` change. Held-out bits/dim is read off each run's
metrics.jsonl. Writes ``ablation.json`` (every curve and the settings), ``ablation.md`` (the table: final test
bits/dim, mean ± sample standard deviation over seeds, and the paper's orderings checked) and ``ablation.png``
(test bits/dim against steps, one panel per coupling, one curve per permutation, seeds' range shaded)::

    python -m benchmarks.ablation --out benchmarks/ablation          # 6 variants x 3 seeds, a few CPU minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

PERMUTATION_LABELS = {"reverse": "reverse (NICE)", "shuffle": "shuffle (RealNVP)", "conv": "1x1 conv (Glow)"}
COUPLINGS = {"additive": False, "affine": True}
PAPER_ORDER = ("conv", "shuffle", "reverse")  # best (lowest bits/dim) first, as the paper found


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/ablation", help="folder for ablation.{json,md,png}")
    p.add_argument("--runs", help="keep the run folders here (default: a temporary folder, removed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--n-flow", type=int, default=8)
    p.add_argument("--n-block", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def variants() -> list[tuple[str, str]]:
    """(permutation, coupling) of the 3x2 grid."""
    return [(perm, coupling) for coupling in COUPLINGS for perm in ("reverse", "shuffle", "conv")]


def run_one(permutation: str, coupling: str, seed: int, args, folder: Path) -> dict:
    """One ``fastglow train`` run -> {curve: [[step, test bpd], ...], final, cpu_s, wall_s}."""
    from fastglow.app.loop import train

    options = dict(out=str(folder), data="digits", n_flow=args.n_flow, n_block=args.n_block, hidden=args.hidden,
                   affine=COUPLINGS[coupling], permutation=permutation, batch=args.batch, lr=args.lr,
                   warmup=args.warmup, steps=args.steps, seed=seed, eval_every=args.eval_every, ckpt_every=0,
                   keep=1, progress=False, threads=args.threads, backend="eager", reversible=False, device="cpu",
                   n_sample=16)
    cpu, wall = time.process_time(), time.perf_counter()
    summary = train(options)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["test_bpd"]] for r in lines if r.get("event") == "eval"]
    return {"permutation": permutation, "coupling": coupling, "seed": seed, "curve": curve,
            "final": summary["test_bpd"], "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def summarise(runs: list[dict]) -> dict:
    """{(permutation, coupling): {mean, std, min, max, n}} of the final test bits/dim over seeds."""
    table = {}
    for perm, coupling in variants():
        finals = [r["final"] for r in runs if (r["permutation"], r["coupling"]) == (perm, coupling)]
        if finals:
            table[perm, coupling] = {"mean": statistics.fmean(finals), "n": len(finals), "min": min(finals),
                                     "max": max(finals),
                                     "std": statistics.stdev(finals) if len(finals) > 1 else 0.0}
    return table


def orderings(table: dict) -> list[str]:
    """The paper's orderings checked on the means: 1x1 conv < shuffle < reverse per coupling, and
    affine <= additive per permutation; each line says holds/fails and the gaps."""
    lines = []
    for coupling in COUPLINGS:
        m = [table[p, coupling]["mean"] for p in PAPER_ORDER]
        holds = m[0] < m[1] < m[2]
        lines.append(f"{coupling}: 1x1 conv < shuffle < reverse {'holds' if holds else 'does not hold'} "
                     f"(shuffle - conv = {m[1] - m[0]:+.4f}, reverse - shuffle = {m[2] - m[1]:+.4f} bits/dim)")
    for perm in PAPER_ORDER:
        gap = table[perm, "affine"]["mean"] - table[perm, "additive"]["mean"]
        lines.append(f"{PERMUTATION_LABELS[perm]}: affine <= additive {'holds' if gap <= 0 else 'does not hold'} "
                     f"(affine - additive = {gap:+.4f} bits/dim)")
    return lines


def markdown(table: dict, settings: dict) -> str:
    seeds = settings["seeds"]
    rows = ["| permutation | additive | affine |", "|---|---|---|"]
    for perm in ("reverse", "shuffle", "conv"):
        cells = [f"{table[perm, c]['mean']:.4f} ± {table[perm, c]['std']:.4f}" for c in COUPLINGS]
        rows.append(f"| {PERMUTATION_LABELS[perm]} | {cells[0]} | {cells[1]} |")
    head = (f"Test bits/dim after {settings['steps']} steps (mean ± sample std over seeds {seeds}); "
            f"K={settings['n_flow']}, L={settings['n_block']}, width {settings['hidden']}, batch "
            f"{settings['batch']}, lr {settings['lr']}.")
    return "\n".join([head, "", *rows, "", *(f"- {line}" for line in orderings(table))]) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Test bits/dim against steps: a panel per coupling, a curve per permutation (mean over seeds, the seeds'
    range shaded), as the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colours = {"reverse": "tab:blue", "shuffle": "tab:green", "conv": "tab:red"}
    for ax, coupling in zip(axes, COUPLINGS):
        for perm in ("reverse", "shuffle", "conv"):
            curves = [r["curve"] for r in runs if (r["permutation"], r["coupling"]) == (perm, coupling)]
            steps = [s for s, _ in curves[0]]
            values = list(zip(*[[v for _, v in c] for c in curves]))
            ax.plot(steps, [statistics.fmean(v) for v in values], color=colours[perm], label=PERMUTATION_LABELS[perm])
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colours[perm],
                            alpha=0.2, linewidth=0)
        ax.set_title(f"{coupling} coupling")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test bits/dim")
    axes[1].legend()
    finals = [r["final"] for r in runs]
    axes[0].set_ylim(min(finals) - 0.1, max(finals) + 0.8)  # the end of training, not the first evaluations
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for seed in args.seeds:
            for perm, coupling in variants():
                runs.append(run_one(perm, coupling, seed, args, root / f"{perm}-{coupling}-seed{seed}"))
                print(f"{perm:8s} {coupling:8s} seed {seed}: test {runs[-1]['final']:.4f} bits/dim "
                      f"({runs[-1]['cpu_s']:.0f} CPU s)", flush=True)
    table = summarise(runs)
    text = markdown(table, settings) + f"\nCPU time, all runs: {sum(r['cpu_s'] for r in runs):.0f} s.\n"
    (out / "ablation.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    (out / "ablation.md").write_text(text)
    plot(runs, out / "ablation.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
