"""rosinality-style LMDB data sets (--data path.lmdb): read image by image, each process with its own
environment; the optional `lmdb` package named in one line when missing."""

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastglow.app.data import load_dataset, open_dataset
from fastglow.app.datasets import LmdbImages, open_lmdb
from fastglow.app.errors import InputError
from fastglow.app.loop import train
from fastglow.testing import assert_one_line_error, run_cli, write_lmdb

lmdb = pytest.importorskip("lmdb")  # part of the [test] extra: present wherever the suite is meant to run


@pytest.fixture
def lmdb_set(tmp_path):
    path = tmp_path / "set.lmdb"
    write_lmdb(path, 24, sizes=(8, 16))
    return path


def test_lmdb_images_are_the_decoded_jpegs_at_the_chosen_size(lmdb_set):
    images, n_bins = open_dataset(str(lmdb_set), img_size=16, n_bits=8)
    assert isinstance(images, LmdbImages) and len(images) == 24 and n_bins == 256
    with open_lmdb(lmdb_set).begin() as txn:  # one environment per file and process: the data set's
        raw = txn.get(b"16-00007")
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(images.levels(7), torch.from_numpy(np.ascontiguousarray(expected)))
    assert load_dataset(str(lmdb_set), img_size=8)[0].shape == (24, 3, 8, 8)  # 5 bits: levels < 32
    with pytest.raises(InputError, match="no images of size 32"):
        open_dataset(str(lmdb_set), img_size=32)


def test_training_on_an_lmdb_with_workers(tmp_path, lmdb_set):
    summary = train(dict(out=str(tmp_path / "run"), data=str(lmdb_set), img_size=8, n_flow=2, n_block=2,
                         hidden=8, batch=8, steps=3, eval_every=0, workers=2, progress=False))
    assert summary["step"] == 3 and np.isfinite(summary["test_bpd"])
    assert summary["config"]["channels"] == 3


def test_missing_lmdb_package_is_named_in_one_line(tmp_path, lmdb_set, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb -> ImportError
    with pytest.raises(InputError, match=r"pip install 'fastglow\[lmdb\]'"):
        open_dataset(str(lmdb_set), img_size=8)
    run = run_cli("train", "--data", lmdb_set, "--out", tmp_path / "run", "--img-size", "8", "--conditional")
    assert_one_line_error(run, lmdb_set, "LMDB")
