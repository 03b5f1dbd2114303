"""``fastglow prepare``: a folder decoded once into a memory-mapped .npy (labels for class folders), atomic,
resumable after an interruption, refusing to overwrite; unreadable images skipped and listed."""

import json

import numpy as np
import pytest
import torch

from fastglow.app import prepare as prep
from fastglow.app.data import load_dataset, open_dataset
from fastglow.app.images import read_image
from fastglow.app.labels import folder_labels, load_labels
from fastglow.app.datasets import ArrayImages
from fastglow.app.errors import InputError
from fastglow.testing import assert_one_line_error, folder_state, run_cli, truncate_image, write_image_folder


@pytest.fixture
def classes(tmp_path):
    root = tmp_path / "classes"
    write_image_folder(root, 11, size=12, classes=3)
    write_image_folder(root / "c1", 2, size=16, mode="L", seed=5, ext="jpg")  # other sizes, modes, formats
    return root


def test_prepared_array_holds_the_folder_s_levels_and_labels(tmp_path, classes):
    out = tmp_path / "set.npy"
    run = run_cli("prepare", classes, out, "--img-size", "8", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "13 images of 3x8x8 at 8 bits, 3 classes" in run.stdout
    images, n_bins = open_dataset(str(out), n_bits=8)
    assert isinstance(images, ArrayImages) and n_bins == 256
    assert torch.equal(images.materialise(), load_dataset(str(classes), img_size=8, n_bits=8)[0])
    assert torch.equal(load_dataset(str(out))[0], load_dataset(str(classes), img_size=8)[0])  # 5 bits by default
    labels, names = load_labels(str(out), 13)
    assert (labels.tolist(), names) == (folder_labels(classes)[0].tolist(), ["c0", "c1", "c2"])
    meta = json.loads((tmp_path / "set.json").read_text())
    assert meta["count"] == 13 and meta["n_bits"] == 8 and meta["skipped"] == []
    assert not list(tmp_path.glob(".set*"))  # no scratch file left


def test_fewer_bits_are_stored_and_a_finer_training_refused(tmp_path, classes):
    out = tmp_path / "four.npy"
    prep.prepare(str(classes), str(out), 8, n_bits=4, workers=0, progress=False)
    levels, n_bins = load_dataset(str(out))
    assert n_bins == 16 and torch.equal(levels, load_dataset(str(classes), img_size=8, n_bits=4)[0])
    with pytest.raises(InputError, match="prepared at --n-bits 4"):
        open_dataset(str(out), n_bits=5)


def test_an_existing_output_is_refused_in_one_line_and_left_alone(tmp_path, classes):
    out = tmp_path / "set.npy"
    out.write_bytes(b"precious")
    before = folder_state(tmp_path)
    assert_one_line_error(run_cli("prepare", classes, out, "--img-size", "8"), out, "already exists")
    assert folder_state(tmp_path) == before


def test_an_interrupted_prepare_resumes_where_it_stopped(tmp_path, classes, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK", 3)
    whole = tmp_path / "whole.npy"
    prep.prepare(str(classes), str(whole), 8, workers=0, progress=False)
    out = tmp_path / "split.npy"
    real_write, writes = prep._write_json, []

    def killed_after_two_chunks(path, obj):
        real_write(path, obj)
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_json", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(classes), str(out), 8, workers=0, progress=False)
    assert not out.exists()  # only the hidden partial file: nothing named split.npy looks complete
    monkeypatch.setattr(prep, "_write_json", real_write)
    real_decode, decoded = prep._decode_chunk, []
    monkeypatch.setattr(prep, "_decode_chunk", lambda b: decoded.append(b) or real_decode(b))
    prep.prepare(str(classes), str(out), 8, workers=0, progress=False)
    assert decoded[0] == (6, 9) and len(decoded) == 3  # chunks 3..5 of 13 images only
    assert np.array_equal(np.load(out), np.load(whole))


def test_unreadable_images_are_skipped_and_listed(tmp_path, classes):
    files = sorted(classes.rglob("*.*"))
    bad = next(i for i, f in enumerate(files) if f.suffix == ".png" and f.parent.name == "c1")
    truncate_image(files[bad])  # its header still reads: found when decoded
    out = tmp_path / "set.npy"
    run = run_cli("prepare", classes, out, "--img-size", "8", "--workers", "2", "--no-progress")
    assert run.returncode == 0 and "1 unreadable skipped" in run.stdout, run.stderr
    array = np.load(out, mmap_mode="r")
    assert array.shape == (12, 3, 8, 8)
    sound = [f for i, f in enumerate(files) if i != bad]
    assert np.array_equal(array, np.stack([read_image(f, 8, 3) for f in sound]))  # the sound ones, in order
    meta = json.loads((tmp_path / "set.json").read_text())
    assert meta["skipped"][0]["file"] == str(files[bad]) and "truncated" in meta["skipped"][0]["reason"]
    labels = np.load(tmp_path / "set.labels.npy")
    assert labels.tolist() == [int(f.parent.name[1:]) for f in sound]


def test_training_reads_a_prepared_array_and_its_labels(tmp_path, classes):
    from fastglow.app.loop import train

    out = tmp_path / "set.npy"
    prep.prepare(str(classes), str(out), 8, workers=0, progress=False)
    summary = train(dict(out=str(tmp_path / "run"), data=str(out), conditional=True, n_flow=2, n_block=2,
                         hidden=8, batch=4, steps=2, eval_every=0, workers=1, test_fraction=0.3, progress=False))
    assert summary["step"] == 2 and summary["config"]["class_names"] == ["c0", "c1", "c2"]
    assert summary["config"]["n_bits"] == 5 and summary["config"]["img_size"] == 8
