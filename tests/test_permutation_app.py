"""``fastglow train --permutation``: a run trains, checkpoints and resumes with its permutation; sample and eval
read the permutation off the checkpoint; contradictory flags are one-line errors. And the ablation's smoke run."""

import json

import pytest
import torch

from fastglow.app.checkpoint import infer_shape, load_model
from fastglow.app.cli import main

TINY = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--no-progress", "--eval-every", "0"]


@pytest.fixture(scope="module")
def shuffle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffle")
    assert main(["train", "--out", str(out), *TINY, "--steps", "3", "--permutation", "shuffle", "--additive"]) == 0
    return out


def _one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, err


def test_a_shuffle_run_checkpoints_its_permutations_and_loads_back(shuffle_run, tmp_path, capsys):
    ckpt = next((shuffle_run / "checkpoints").glob("step_*.pt"))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["config"]["permutation"] == "shuffle"
    model, info = load_model(ckpt, {})
    assert (info["permutation"], info["affine"]) == ("shuffle", False)
    assert torch.equal(model.blocks[1].flows[1].invconv.perm, saved["model"]["blocks.1.flows.1.invconv.perm"])
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ckpt)]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(ckpt), "--n", "4", "--out", str(tmp_path / "s.png"),
                 "--permutation", "shuffle"]) == 0
    rc = main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "r.png"), "--permutation", "reverse"])
    _one_line_error(capsys, rc, "--permutation shuffle", "--permutation reverse")


def test_resume_keeps_the_permutation(shuffle_run, capsys):
    rc = main(["train", "--out", str(shuffle_run), "--resume", "--steps", "4", "--permutation", "conv"])
    _one_line_error(capsys, rc, "permutation='shuffle'")
    assert main(["train", "--out", str(shuffle_run), "--resume", "--steps", "4", "--no-progress"]) == 0


def test_contradictory_flags_are_one_line_errors(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "a"), *TINY, "--permutation", "reverse", "--no-lu"])
    _one_line_error(capsys, rc, "--no-lu", "--permutation conv")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "b"), "--permutation", "1x1"])
    assert exit_.value.code == 2


def test_shape_inference_tells_the_variants_apart():
    import fastglow

    for permutation in ("conv", "shuffle", "reverse"):
        state = fastglow.Glow(1, 2, 2, hidden_channels=4, permutation=permutation).state_dict()
        shape = infer_shape(state, "x.pt")
        assert shape["permutation"] == permutation
        assert shape["conv_lu"] is (True if permutation == "conv" else None)


def test_ablation_smoke_run_writes_table_and_plot(tmp_path):
    from benchmarks.ablation import main as ablation

    assert ablation(["--out", str(tmp_path), "--seeds", "0", "1", "--steps", "2", "--eval-every", "1",
                     "--n-flow", "1", "--hidden", "4", "--batch", "16", "--warmup", "1"]) == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert len(data["runs"]) == 12 and all(len(r["curve"]) == 2 for r in data["runs"])
    table = (tmp_path / "ablation.md").read_text()
    for label in ("reverse (NICE)", "shuffle (RealNVP)", "1x1 conv (Glow)", "1x1 conv < shuffle < reverse"):
        assert label in table
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_summary_and_orderings():
    from benchmarks.ablation import orderings, summarise, variants

    finals = {"reverse": 3.0, "shuffle": 2.5, "conv": 2.0}
    runs = [{"permutation": p, "coupling": c, "final": finals[p] + (0.1 if c == "affine" else 0) + s / 100}
            for p, c in variants() for s in (0, 2)]
    table = summarise(runs)
    assert table["shuffle", "affine"]["mean"] == pytest.approx(2.61)
    assert table["shuffle", "affine"]["std"] == pytest.approx(0.02 ** 0.5 / 10)
    lines = orderings(table)
    assert lines[0].startswith("additive: 1x1 conv < shuffle < reverse holds")
    assert "affine <= additive does not hold (affine - additive = +0.1000" in lines[2]
