"""Class-conditional runs end to end: labels of digits, class folders and .npz; fastglow train --conditional,
eval (bits/dim and accuracy), sample --class, morph; one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastglow.app import checkpoint as ckpt_io
from fastglow.app.cli import main
from fastglow.app.data import bin_centres, digit_levels, load_dataset, to_pixels
from fastglow.app.labels import load_labels
from fastglow.app.errors import InputError

TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--no-progress",
              "--eval-every", "0"]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    assert main(["train", "--conditional", "--out", str(out), *TINY_FLAGS, "--steps", "30", "--lr", "5e-3"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt(cond_run):
    return str(ckpt_io.list_checkpoints(cond_run)[0][1])


def _one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for name in names:
        assert str(name) in err, err


def _class_folder(root, classes, per_class=3, size=8):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size), 40 * k + 10 * i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_labels_of_digits_class_folders_and_npz(tmp_path):
    labels, names = load_labels("digits", 1797)
    assert names == [str(k) for k in range(10)] and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    folder = _class_folder(tmp_path / "f", ["zebra", "ant", "mole"])
    (folder / "ant" / "deeper").mkdir()
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "ant" / "deeper" / "x.png")
    levels, _ = load_dataset(str(folder), img_size=8, n_bits=8)
    labels, names = load_labels(str(folder), levels.shape[0])
    assert names == ["ant", "mole", "zebra"]  # sorted names -> ids
    # each image carries its first-level subfolder's class (zebra 0/10/20, ant 40/50/60 and the nested 7, mole 80..)
    expected = {0: [7, 40, 50, 60], 1: [80, 90, 100], 2: [0, 10, 20]}
    assert {k: sorted(levels[labels == k][:, 0, 0, 0].tolist()) for k in range(3)} == expected
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 3, 1, 3]))
    labels, names = load_labels(str(npz), 4)
    assert labels.tolist() == [0, 2, 1, 2] and names == ["0", "1", "3"]  # the values present (issue 23, item 7)


@pytest.mark.parametrize("case,match", [
    ("loose", "outside the class subfolders"), ("one_class", "at least 2 classes"),
    ("npz_missing", "no array named 'labels'"), ("npz_float", "1-D integer"), ("npz_negative", "negative"),
    ("npz_count", "3 labels for 4 images")])
def test_bad_labels_are_one_line_input_errors(tmp_path, case, match):
    if case in ("loose", "one_class"):
        folder = _class_folder(tmp_path / "f", ["a", "b"] if case == "loose" else ["a"])
        if case == "loose":
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "stray.png")
        source, n = str(folder), 4 if case == "loose" else 3
    else:
        arrays = {"npz_missing": {}, "npz_float": dict(labels=np.zeros(4)),
                  "npz_negative": dict(labels=np.array([0, -1, 1, 1])), "npz_count": dict(labels=np.arange(3))}[case]
        source, n = str(tmp_path / "d.npz"), 4
        np.savez(source, images=np.zeros((4, 8, 8), np.uint8), **arrays)
    with pytest.raises(InputError, match=match) as info:
        load_labels(source, n if case != "loose" else 7)
    assert "\n" not in str(info.value)


def test_conditional_train_eval_and_checkpoint_config(cond_run, ckpt, capsys):
    config = torch.load(ckpt)["config"]
    assert config["conditional"] and config["n_classes"] == 10 and config["class_names"][3] == "3"
    grid = Image.open(next((cond_run / "samples").glob("*.png")))
    assert grid.size == (6 * 10 + 2, 10 * 10 + 2)  # n_sample 64 -> 6 per class, a row per class
    assert main(["eval", "--ckpt", ckpt]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("test bits/dim") and "359 images" in line and "classification accuracy" in line
    accuracy = float(line.rsplit(" ", 1)[1])
    assert 0.2 < accuracy <= 1  # 30 steps: well above chance (0.1), far from trained


def test_sample_one_class_and_all_classes(ckpt, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["sample", "--ckpt", ckpt, "--class", "3", "--n", "4", "--nrow", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 10 + 2, 12)
    assert main(["sample", "--ckpt", ckpt, "--class", "all", "--n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 10 + 2, 10 * 10 + 2)
    assert main(["sample", "--ckpt", ckpt, "--n", "5", "--out", str(out)]) == 0  # classes drawn uniformly
    ends = []
    for i in range(2):  # interpolate needs no labels: the flow never sees them
        ends.append(tmp_path / f"{i}.png")
        Image.fromarray(to_pixels(bin_centres(digit_levels()[i], 17), 17)[0]).save(ends[-1])
    assert main(["interpolate", "--ckpt", ckpt, *map(str, ends), "--steps", "3", "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out))[2:10, 2:10], np.asarray(Image.open(ends[0])))


def test_conditional_resume_is_bit_identical(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    flags = ["--conditional", *TINY_FLAGS, "--warmup", "2", "--cooldown", "0", "--ckpt-every", "2"]
    assert main(["train", "--out", str(whole), *flags, "--steps", "4"]) == 0
    assert main(["train", "--out", str(split), *flags, "--steps", "2"]) == 0
    assert main(["train", "--out", str(split), "--resume", "--steps", "4", "--no-progress"]) == 0
    a, b = (torch.load(ckpt_io.list_checkpoints(out)[0][1]) for out in (whole, split))
    assert a["step"] == b["step"] == 4 and a["config"]["conditional"] and b["config"]["conditional"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_morph_strip_starts_at_the_held_out_image(ckpt, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["morph", "--ckpt", ckpt, "--from", "3", "--to", "8", "--steps", "5", "--index", "1",
                 "--out", str(out)]) == 0
    strip = np.asarray(Image.open(out))
    assert strip.shape == (12, 5 * 10 + 2)
    from fastglow.app.model_io import run_split
    saved = torch.load(ckpt)
    info = {"config": saved["config"], "dataset": saved["dataset"], "n_bins": 17}
    levels, labels = run_split(digit_levels(), load_labels("digits", 1797)[0], "digits", info)[1]
    image = to_pixels(bin_centres(levels[labels == 3][1], 17), 17)[0]
    assert np.array_equal(strip[2:10, 2:10], image)  # t = 0 decodes the image's own latents
    assert not np.array_equal(strip[2:10, 42:50], image)


@pytest.mark.parametrize("argv,names", [
    (["sample", "--class", "10"], ["--class 10", "ids 0..9"]),
    (["sample", "--class", "seven"], ["--class seven"]),
    (["morph", "--from", "3", "--to", "11"], ["--to 11"]),
    (["morph", "--from", "3", "--to", "8", "--index", "500"], ["--index 500", "class 3"]),
    (["morph", "--from", "3", "--to", "8", "--steps", "1"], ["--steps"])])
def test_bad_class_flags_are_one_line(ckpt, tmp_path, capsys, argv, names):
    rc = main([argv[0], "--ckpt", ckpt, *argv[1:], "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, *names)


def test_class_flags_on_an_unconditional_checkpoint_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--steps", "2"]) == 0
    plain = str(ckpt_io.list_checkpoints(out)[0][1])
    rc = main(["sample", "--ckpt", plain, "--class", "3", "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, plain, "unconditional")
    rc = main(["morph", "--ckpt", plain, "--from", "3", "--to", "8", "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, plain, "unconditional")
    rc = main(["train", "--out", str(out), "--resume", "--conditional", "--steps", "4", "--no-progress"])
    _one_line_error(capsys, rc, "conditional=False")


def test_class_folder_run_stores_class_names_and_samples_by_name(tmp_path, capsys):
    folder = _class_folder(tmp_path / "f", ["circle", "square"], per_class=10)
    out = tmp_path / "run"
    assert main(["train", "--conditional", "--data", str(folder), "--img-size", "8", "--out", str(out),
                 *TINY_FLAGS, "--batch", "8", "--steps", "2", "--test-fraction", "0.2"]) == 0
    ckpt = str(ckpt_io.list_checkpoints(out)[0][1])
    assert torch.load(ckpt)["config"]["class_names"] == ["circle", "square"]
    assert main(["sample", "--ckpt", ckpt, "--class", "square", "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["eval", "--ckpt", ckpt]) == 0
    assert "classification accuracy" in capsys.readouterr().out
    other = _class_folder(tmp_path / "g", ["circle", "star"], per_class=2)
    rc = main(["eval", "--ckpt", ckpt, "--data", str(other)])
    _one_line_error(capsys, rc, "star", "square")
