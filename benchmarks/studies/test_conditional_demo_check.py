"""The class-conditional demo check (benchmarks/studies/conditional_demo_check.py) on a short run: the mechanism;
the 3-minute figures are in benchmarks/RESULTS.md."""

import math

import pytest
import torch

from benchmarks.studies.conditional_demo_check import measure
from fastglow.app import checkpoint as ckpt_io
from fastglow.app.cli import main


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A 30-step class-conditional run on the digits (K=2, L=2, width 8, batch 16)."""
    out = tmp_path_factory.mktemp("cond")
    flags = "--n-flow 2 --n-block 2 --hidden 8 --batch 16 --no-progress --eval-every 0 --steps 30 --lr 5e-3"
    assert main(["train", "--conditional", "--out", str(out), *flags.split()]) == 0
    return out


def test_demo_check_measures_a_short_run(cond_run, tmp_path):
    """The demo check's pipeline on the 30-step run: every figure is there and in range; the twin is the same run
    unconditional; the sample judge (logistic regression on 17-level pixels) reads real digits well."""
    result = measure(cond_run, tmp_path / "twin", per_class=5)
    twin = torch.load(ckpt_io.list_checkpoints(tmp_path / "twin")[0][1])["config"]
    cond = torch.load(ckpt_io.list_checkpoints(cond_run)[0][1])["config"]
    derived = ("conditional", "out", "n_classes", "class_names")
    assert not twin["conditional"] and {k: v for k, v in twin.items() if k not in derived} == \
        {k: v for k, v in cond.items() if k not in derived}
    assert result["judge_accuracy_on_held_out"] > 0.9
    for key in ("classify_accuracy", "sample_recognition"):
        assert 0 <= result[key] <= 1
    assert len(result["sample_recognition_per_class"]) == 10
    for key in ("test_bpd", "test_bpd_marginal", "twin_test_bpd"):
        assert 1.0 < result[key] < 6.0
    # p(x) = sum_y p(y) p(x|y) >= p(y_true) p(x|y_true) on the same noise: the marginal costs at most
    # -log2 min_y p(y) / D bits/dim more than the conditional density (digits: p(y) >= 0.09, D = 64)
    assert result["test_bpd_marginal"] <= result["test_bpd"] + math.log2(1 / 0.09) / 64
