"""``fastglow train --permutation``: a run trains, checkpoints and resumes with its permutation; sample and eval
read the permutation off the checkpoint; contradictory flags are one-line errors."""

import pytest
import torch

from fastglow.app.model_io import infer_shape, load_model
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
