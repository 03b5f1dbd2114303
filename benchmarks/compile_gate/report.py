"""The sm_90 compile gate: every launch specialisation of the real models, compiled for the H100.

    python -m benchmarks.compile_report [--verify] [--subset] [--json F] [--md F]

Captures the launches of ``fastglow.Glow(backend="triton")`` (forward, reversible and plain backward,
reverse, sample) at the real shapes in float32 and float64 (:mod:`benchmarks.compile_gate.launch_capture`), compiles
each distinct specialisation for sm_90 (:mod:`benchmarks.compile_gate.sm90`) and prints one row per specialisation:
registers, spills, shared memory, CTAs per SM, the largest grid it gets at the real batch, and the waves
that grid makes on 132 SMs. The gate fails a row on: a compile error; shared memory over 232,448 B; any
spill in float32; fewer than 2 CTAs per SM by registers where a launch has >= 264 programs (2 per SM).
``--verify`` also interprets every kernel at batch 1 and K=2 and checks it sees the same specialisations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # capture runs the CPU backend; compiling is a subprocess

from benchmarks.compile_gate import launch_capture as capture_mod  # noqa: E402
from benchmarks.compile_gate import sm90  # noqa: E402

MIN_PROGRAMS_FOR_OCCUPANCY = 2 * sm90.N_SM


@dataclass
class Row:
    """One specialisation, its compile result and every launch of it."""
    spec: capture_mod.Spec
    result: dict
    launches: list = field(default_factory=list)

    @property
    def max_launch(self):
        return max(self.launches, key=lambda l: l.programs)

    @property
    def occupancy(self) -> dict:
        if "error" in self.result:
            return dict(by_regs=0, by_threads=0, by_smem=0, ctas=0)
        return sm90.ctas_per_sm(self.result["regs"], self.result["shared"], self.spec.num_warps)

    @property
    def spills(self) -> int:
        return self.result.get("spill_stores", 0) + self.result.get("spill_loads", 0)

    @property
    def waves(self) -> float:
        return self.max_launch.programs / (sm90.N_SM * max(self.occupancy["ctas"], 1))

    def failures(self) -> list[str]:
        r = self.result
        if "error" in r:
            return [f"compile error: {r['error']}"]
        out = []
        if r["shared"] > sm90.SMEM_PER_CTA:
            out.append(f"shared memory {r['shared']} B > {sm90.SMEM_PER_CTA}")
        if self.spec.dtype == "float32" and self.spills:
            out.append(f"float32 spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        if self.max_launch.programs >= MIN_PROGRAMS_FOR_OCCUPANCY and self.occupancy["by_regs"] < 2:
            out.append(f"{r['regs']} registers x {self.spec.num_warps} warps: {self.occupancy['by_regs']} "
                       f"CTA/SM with {self.max_launch.programs} programs")
        return out

    def levels(self) -> str:
        """Where it launches: 'model shape: level shapes'."""
        by_shape: dict[str, list[str]] = {}
        for l in self.launches:
            wheres = by_shape.setdefault(l.shape, [])
            if l.where not in wheres:
                wheres.append(l.where)
        return "; ".join(f"{s}: {', '.join(w)}" for s, w in by_shape.items())

    def to_json(self) -> dict:
        m = self.max_launch
        return dict(spec=self.spec.to_json(), result=self.result, occupancy=self.occupancy,
                    max_grid=m.grid, max_programs=m.programs, waves=self.waves, levels=self.levels(),
                    phases=sorted({l.phase for l in self.launches}), failures=self.failures())


def build_rows(launches, results_by_spec: dict) -> list[Row]:
    rows: dict = {}
    for launch in launches:
        row = rows.setdefault(launch.spec, Row(launch.spec, results_by_spec[launch.spec]))
        row.launches.append(launch)
    return list(rows.values())


def representative(launches) -> list:
    """One launch specialisation per kernel, dtype, tile sizes and warps (so per level): the one with the
    most boolean constexprs on (coupling, affine, store, logdet...), i.e. the most code, hence registers."""
    groups: dict = {}
    for spec in dict.fromkeys(l.spec for l in launches):
        tiles = tuple((k, v) for k, v in spec.constexprs if not isinstance(v, bool))
        key = (spec.kernel, spec.dtype, tiles, spec.num_warps)
        n_on = sum(v is True for _, v in spec.constexprs)
        if key not in groups or n_on > groups[key][0]:
            groups[key] = (n_on, spec)
    chosen = {spec for _, spec in groups.values()}
    return [l for l in launches if l.spec in chosen]


def run_gate(launches, cache_dir: Path = sm90.CACHE_DIR, timeout: float | None = None) -> list[Row]:
    """Compile every distinct specialisation among ``launches`` for sm_90 (in a subprocess) and build the rows
    (the limits applied are the H100's)."""
    specs = list(dict.fromkeys(l.spec for l in launches))
    results = sm90.run_subprocess([s.to_json() for s in specs], 90, cache_dir, timeout)
    return build_rows(launches, dict(zip(specs, results)))


def summary(rows: list[Row]) -> dict:
    """Counts per dtype: specialisations, failing ones, float32 spills (and >= 1 KB), smem overflows."""
    out = {}
    for dtype in capture_mod.DTYPES:
        sub = [r for r in rows if r.spec.dtype == dtype]
        ok = [r for r in sub if "error" not in r.result]
        out[dtype] = dict(
            specialisations=len(sub), failing=sum(bool(r.failures()) for r in sub),
            compile_errors=len(sub) - len(ok), spilling=sum(r.spills > 0 for r in ok),
            spilling_1kb=sum(r.result["spill_stores"] >= 1024 for r in ok),
            worst_spill=max((r.result["spill_stores"] for r in ok), default=0),
            smem_over=sum(r.result["shared"] > sm90.SMEM_PER_CTA for r in ok),
            max_smem=max((r.result["shared"] for r in ok), default=0),
            low_occupancy=sum(any("CTA/SM" in f for f in r.failures()) for r in ok),
            max_regs=max((r.result["regs"] for r in ok), default=0))
    return out


def summary_markdown(counts: dict) -> str:
    """The summary counts as a Markdown table, one column per dtype."""
    keys = list(next(iter(counts.values())))
    lines = ["| | " + " | ".join(counts) + " |", "|---|" + "---:|" * len(counts)]
    lines += [f"| {k} | " + " | ".join(str(c[k]) for c in counts.values()) + " |" for k in keys]
    return "\n".join(lines)


def _cells(r: Row) -> list[str]:
    res, occ, m = r.result, r.occupancy, r.max_launch
    if "error" in res:
        hw = ["error", "-", "-", "-"]
    else:
        spill = f"{res['spill_stores']}/{res['spill_loads']}" if r.spills else "0"
        hw = [str(res["regs"]), spill, str(res["shared"]), f"{occ['ctas']} (regs {occ['by_regs']})"]
    return [r.spec.name, r.spec.dtype[5:], r.spec.label(), *hw, "x".join(map(str, m.grid)),
            f"{r.waves:.2f}", r.levels(), "; ".join(r.failures()) or "ok"]


HEADER = ["kernel", "fp", "specialisation", "regs", "spill st/ld B", "smem B", "CTAs/SM", "grid (real batch)",
          "waves", "launched at", "gate"]


def markdown(rows: list[Row], only_failing: bool = False, limit: int | None = None) -> str:
    """The table, worst first (failures, then spill bytes, then shared memory)."""
    rows = sorted(rows, key=lambda r: (not r.failures(), -r.result.get("spill_stores", 0),
                                       -r.result.get("shared", 0), r.spec.name))
    rows = [r for r in rows if r.failures()] if only_failing else rows
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows[:limit]]
    return "\n".join(lines)


def verify_capture(shapes=capture_mod.SHAPES) -> list[str]:
    """Interpret every kernel (batch 1, K=2) and compare its specialisations with the shape-only capture's."""
    problems = []
    for shape in shapes:
        for dtype in capture_mod.DTYPES:
            executed = {l.spec for l in capture_mod.capture(shape, dtype, execute=True)}
            recorded = {l.spec for l in capture_mod.capture(shape, dtype)}
            if executed != recorded:
                problems.append(f"{shape.name} {dtype}: {len(executed ^ recorded)} specialisations differ")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write every row as JSON here")
    parser.add_argument("--md", default=None, help="write the full Markdown table here")
    parser.add_argument("--verify", action="store_true", help="also interpret the kernels and compare")
    parser.add_argument("--subset", action="store_true", help="only representative() specialisations (CI's)")
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify_capture()
        print("verify:", "; ".join(problems) or "executed and shape-only captures agree")
    launches = capture_mod.capture_all()
    rows = run_gate(representative(launches) if args.subset else launches)
    counts = summary(rows)
    table = markdown(rows)
    print(table)
    print(summary_markdown(counts))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(arch=90, summary=counts,
                                                   rows=[r.to_json() for r in rows]), indent=1))
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 1 if any(r.failures() for r in rows) or (args.verify and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
