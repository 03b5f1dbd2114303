"""benchmarks/suites/report.py turns pytest-benchmark JSON into tables and a plot."""

import json

from benchmarks.suites.report import load_rows, main, markdown_tables


def _json(tmp_path):
    bench = lambda group, name, median, extra: dict(  # noqa: E731
        group=group, name=name, stats=dict(median=median, rounds=5), extra_info=extra)
    data = dict(machine_info=dict(node="box", cpu=dict(brand_raw="cpu"), python_version="3.11"),
                benchmarks=[bench("step", "fast", 0.010, {"peak_memory_gb": 1.5}),
                            bench("step", "eager", 0.025, {}), bench("copy", "copy", 0.002, {"gbps": 900.0})])
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_tables_give_medians_and_ratios(tmp_path):
    text = markdown_tables(*load_rows(_json(tmp_path)))
    assert "### step" in text and "### copy" in text
    assert "| fast | 10.000 | 1.00x | 5 | peak_memory_gb=1.5 |" in text
    assert "| eager | 25.000 | 2.50x | 5 |  |" in text


def test_main_writes_markdown_and_png(tmp_path):
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    assert main([str(_json(tmp_path)), "--out", str(out), "--plot", str(png)]) == 0
    assert out.read_text().startswith("Machine: box")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
