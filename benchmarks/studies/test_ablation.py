"""benchmarks/studies/ablation.py: a smoke run of the whole grid writes the table and the plot; the summary maths."""

import json

import pytest

from benchmarks.studies.ablation import main as ablation
from benchmarks.studies.ablation import orderings, summarise, variants


def test_ablation_smoke_run_writes_table_and_plot(tmp_path):
    assert ablation(["--out", str(tmp_path), "--seeds", "0", "1", "--steps", "2", "--eval-every", "1",
                     "--n-flow", "1", "--hidden", "4", "--batch", "16", "--warmup", "1"]) == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert len(data["runs"]) == 12 and all(len(r["curve"]) == 2 for r in data["runs"])
    table = (tmp_path / "ablation.md").read_text()
    for label in ("reverse (NICE)", "shuffle (RealNVP)", "1x1 conv (Glow)", "1x1 conv < shuffle < reverse"):
        assert label in table
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_summary_and_orderings():
    finals = {"reverse": 3.0, "shuffle": 2.5, "conv": 2.0}
    runs = [{"permutation": p, "coupling": c, "final": finals[p] + (0.1 if c == "affine" else 0) + s / 100}
            for p, c in variants() for s in (0, 2)]
    table = summarise(runs)
    assert table["shuffle", "affine"]["mean"] == pytest.approx(2.61)
    assert table["shuffle", "affine"]["std"] == pytest.approx(0.02 ** 0.5 / 10)
    lines = orderings(table)
    assert lines[0].startswith("additive: 1x1 conv < shuffle < reverse holds")
    assert "affine <= additive does not hold (affine - additive = +0.1000" in lines[2]
