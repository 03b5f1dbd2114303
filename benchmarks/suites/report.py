"""Turn pytest-benchmark JSON into Markdown tables (medians, ratios within each group) and a PNG plot.

    python -m benchmarks.suites.report bench.json --out benchmarks/results_table.md --plot benchmarks/results.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_rows(path: str | Path) -> tuple[dict, list[dict]]:
    """(machine/commit header, one row per benchmark with group, name, median seconds, extra_info)."""
    data = json.loads(Path(path).read_text())
    rows = [dict(group=b.get("group") or "", name=b["name"], median_s=b["stats"]["median"],
                 rounds=b["stats"]["rounds"], extra=b.get("extra_info", {})) for b in data["benchmarks"]]
    return data.get("machine_info", {}), rows


def markdown_tables(machine: dict, rows: list[dict]) -> str:
    """One table per group; 'vs fastest' is each median over the group's fastest median."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    lines = [f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"python {machine.get('python_version', '?')}", ""]
    for group, members in groups.items():
        fastest = min(r["median_s"] for r in members)
        lines += [f"### {group}", "", "| benchmark | median (ms) | vs fastest | rounds | extra |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for r in sorted(members, key=lambda r: r["median_s"]):
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["extra"].items())
            lines.append(f"| {r['name']} | {1e3 * r['median_s']:.3f} | {r['median_s'] / fastest:.2f}x | "
                         f"{r['rounds']} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> None:
    """Horizontal bars of median time per benchmark, one panel per group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * len(rows)), squeeze=False)
    for ax, (group, members) in zip(axes[:, 0], groups.items()):
        ax.barh([r["name"] for r in members], [1e3 * r["median_s"] for r in members])
        ax.set_title(group)
        ax.set_xlabel("median time (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    args = parser.parse_args(argv)
    machine, rows = load_rows(args.json)
    text = markdown_tables(machine, rows)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
