"""The ``fastglow`` command: sample / eval / interpolate on a trained checkpoint, and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastglow
from fastglow.app.cli import main
from fastglow.app.data import bin_centres, digit_levels, save_png, to_pixels

TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--no-progress",
              "--eval-every", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--steps", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return str(next((run_dir / "checkpoints").glob("step_*.pt")))


def _one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert str(name) in err, err
    return err


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "fastglow", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fastglow {fastglow.__version__}"
    out = subprocess.run([sys.executable, "-m", "fastglow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "sample", "eval", "interpolate"))


def test_the_library_does_not_import_the_app():
    code = ("import fastglow, sys; "
            "assert 'PIL' not in sys.modules and 'sklearn' not in sys.modules and 'fastglow.app' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_train_writes_checkpoint_samples_and_log(run_dir, capsys):
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl", "samples"]
    grid = Image.open(next((run_dir / "samples").glob("*.png")))
    assert grid.size == (8 * 10 + 2, 8 * 10 + 2) and grid.mode == "L"  # 64 samples, 8 per row, padding 2


def test_sample_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", ckpt, "--n", "6", "--temperature", "0.5", "--nrow", "3", "--zoom", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 18 + 2, 2 * 18 + 2)


def test_sample_from_a_bare_rosinality_state_dict(ckpt, tmp_path, capsys):
    bare = tmp_path / "rosinality.pt"
    torch.save(torch.load(ckpt)["model"], bare)
    out = tmp_path / "grid.png"
    flags = ["--in-channel", "1", "--n-flow", "2", "--n-block", "2", "--img-size", "8", "--hidden", "8",
             "--affine"]
    assert main(["sample", "--ckpt", str(bare), *flags, "--n", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (22, 22)
    rc = main(["sample", "--ckpt", str(bare), "--n-flow", "3", "--out", str(out)])
    _one_line_error(capsys, rc, bare, "--n-flow 2")
    rc = main(["sample", "--ckpt", str(bare), "--additive", "--out", str(out)])
    _one_line_error(capsys, rc, bare, "--affine")


def test_eval_reports_held_out_bits_per_dim(ckpt, capsys):
    assert main(["eval", "--ckpt", ckpt]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("test bits/dim") and "359 images" in line
    assert 2.0 < float(line.split()[2]) < 6.0
    assert main(["eval", "--ckpt", ckpt, "--split", "all", "--batch", "1000"]) == 0
    assert "1797 images" in capsys.readouterr().out


def test_interpolate_strip_starts_and_ends_at_the_inputs(ckpt, tmp_path, capsys):
    levels = digit_levels()[:2]
    ends = []
    for i in range(2):
        ends.append(tmp_path / f"{i}.png")
        save_png(to_pixels(bin_centres(levels[i], 17), 17), ends[-1])
    out = tmp_path / "strip.png"
    assert main(["interpolate", "--ckpt", ckpt, *map(str, ends), "--steps", "5", "--out", str(out)]) == 0
    strip = np.asarray(Image.open(out))
    assert strip.shape == (12, 5 * 10 + 2)
    for i, col in ((0, 2), (1, 2 + 4 * 10)):  # reverse(reconstruct=True) of the end latents gives the inputs
        assert np.array_equal(strip[2:10, col:col + 8], np.asarray(Image.open(ends[i])))


def _image_folder(root, size):
    root.mkdir()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(root / "x.png")
    return root


@pytest.mark.parametrize("case", ["empty", "unreadable", "small", "missing", "corrupt_ckpt", "other_shape",
                                  "not_a_checkpoint", "size_vs_levels"])
def test_bad_input_is_one_line_naming_the_file(ckpt, tmp_path, capsys, case):
    out = ["--out", str(tmp_path / "run")]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        rc = main(["train", "--data", str(tmp_path / "empty"), "--img-size", "8", *TINY_FLAGS, *out])
        _one_line_error(capsys, rc, tmp_path / "empty", "no images")
    elif case == "unreadable":
        folder = _image_folder(tmp_path / "imgs", 8)
        (folder / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
        rc = main(["train", "--data", str(folder), "--img-size", "8", *TINY_FLAGS, *out])
        _one_line_error(capsys, rc, folder / "bad.jpg", "cannot read")
    elif case == "small":
        folder = _image_folder(tmp_path / "imgs", 6)
        rc = main(["train", "--data", str(folder), "--img-size", "8", *TINY_FLAGS, *out])
        _one_line_error(capsys, rc, folder / "x.png", "smaller than --img-size 8")
    elif case == "missing":
        rc = main(["eval", "--ckpt", ckpt, "--data", str(tmp_path / "nowhere")])
        _one_line_error(capsys, rc, tmp_path / "nowhere")
    elif case == "corrupt_ckpt":
        bad = tmp_path / "cut.pt"
        bad.write_bytes(open(ckpt, "rb").read()[:2000])
        rc = main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "g.png")])
        _one_line_error(capsys, rc, bad, "corrupt")
    elif case == "other_shape":
        other = tmp_path / "other.pt"
        torch.save(fastglow.Glow(3, 2, 2, hidden_channels=8).state_dict(), other)
        rc = main(["eval", "--ckpt", str(other), "--data", "digits"])
        _one_line_error(capsys, rc, other, "3x8x8")
        state = torch.load(ckpt)["model"]
        state["blocks.0.flows.0.coupling.net.2.weight"] = torch.zeros(8, 4, 1, 1)
        torch.save(state, other)
        rc = main(["sample", "--ckpt", str(other), "--img-size", "8", "--out", str(tmp_path / "g.png")])
        _one_line_error(capsys, rc, other, "does not fit")
    elif case == "size_vs_levels":
        rc = main(["train", "--n-block", "4", *out])
        _one_line_error(capsys, rc, "digits", "2**n_block = 16")
    else:
        junk = tmp_path / "junk.pt"
        torch.save([1, 2, 3], junk)
        rc = main(["interpolate", "--ckpt", str(junk), str(junk), str(junk)])
        _one_line_error(capsys, rc, junk)


def test_errors_exit_nonzero_without_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "fastglow", "sample", "--ckpt", str(bad)], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and str(bad) in run.stderr
