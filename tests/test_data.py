"""Data sets (digits, image folders, .npz), quantisation, batches and PNG grids."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fastglow.app.data import (DIGITS_LEVELS, bin_centres, dequantize, image_grid, load_dataset, load_digits,
                               open_dataset, to_levels, to_pixels)
from fastglow.app.datasets import ArrayImages
from fastglow.app.sampler import StepBatches, device_batch, fill_bad
from fastglow.app.errors import InputError


def _write(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_digits_are_embedded_17_levels_and_split_deterministically():
    levels, n_bins = load_dataset("digits")
    assert n_bins == DIGITS_LEVELS == 17 and levels.dtype == torch.uint8
    assert levels.shape == (1797, 1, 8, 8) and levels.max() == 16 and levels.min() == 0
    train_a, test_a = load_digits(torch.Generator().manual_seed(0))
    train_b, test_b = load_digits(torch.Generator().manual_seed(0))
    assert test_a.shape[0] == 359 and torch.equal(test_a, test_b) and torch.equal(train_a, train_b)


def test_dequantize_stays_inside_each_bin():
    levels = torch.arange(17).view(1, 1, 1, 17)
    x = dequantize(levels, 17, torch.Generator().manual_seed(0))
    assert x.min() >= -0.5 and x.max() < 0.5
    assert torch.equal(torch.floor((x + 0.5) * 17).long(), levels)
    assert torch.equal(torch.floor((bin_centres(levels, 17) + 0.5) * 17).long(), levels)


def test_image_folder_resizes_crops_and_detects_channels(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.png", (20, 12), "L")
    _write(tmp_path / "sub" / "b.jpg", (16, 16), "L", seed=1)
    (tmp_path / "notes.txt").write_text("not an image")
    levels, n_bins = load_dataset(str(tmp_path), img_size=8)
    assert levels.shape == (2, 1, 8, 8) and n_bins == 32 and levels.max() < 32
    _write(tmp_path / "c.png", (9, 9), "RGB", seed=2)
    levels, n_bins = load_dataset(str(tmp_path), img_size=8, n_bits=8)
    assert levels.shape == (3, 3, 8, 8) and n_bins == 256
    assert load_dataset(str(tmp_path), img_size=8, channels=1)[0].shape == (3, 1, 8, 8)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (5, 1 if layout == "NHW" else 3, 8, 8), dtype=np.uint8)
    arr = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    np.savez(tmp_path / "d.npz", images=arr, labels=np.arange(5))
    levels, n_bins = load_dataset(str(tmp_path / "d.npz"), n_bits=8)
    assert torch.equal(levels, torch.from_numpy(nchw)) and n_bins == 256
    assert load_dataset(str(tmp_path / "d.npz"), n_bits=4)[0].max() < 16


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npy_layouts_are_read_image_by_image(tmp_path, layout):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (5, 1 if layout == "NHW" else 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "d.npy", {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout])
    images, n_bins = open_dataset(str(tmp_path / "d.npy"), n_bits=8)
    assert isinstance(images, ArrayImages) and n_bins == 256
    assert torch.equal(images.materialise(), torch.from_numpy(nchw))
    refit, _ = open_dataset(str(tmp_path / "d.npy"), img_size=4, channels=3)  # resized and converted per image
    assert refit.levels(2).shape == (3, 4, 4) and refit.levels(2).max() < 32


@pytest.mark.parametrize("case", ["empty", "unreadable", "small", "missing", "npz_dtype", "npz_key", "npz_bad"])
def test_bad_data_names_the_file(tmp_path, case):
    target = tmp_path / "data"
    target.mkdir()
    culprit = str(target)
    if case == "unreadable":
        (target / "broken.png").write_bytes(b"\x89PNG not really")
        culprit = "broken.png"
    elif case == "small":
        _write(target / "tiny.png", (6, 30))
        culprit = "tiny.png"
    elif case == "missing":
        target = culprit = str(tmp_path / "nowhere")
    elif case.startswith("npz"):
        target = tmp_path / "d.npz"
        culprit = "d.npz"
        if case == "npz_dtype":
            np.savez(target, images=np.zeros((2, 8, 8), dtype=np.float32))
        elif case == "npz_key":
            np.savez(target, a=np.zeros((2, 8, 8), np.uint8), b=np.zeros(2))
        else:
            target.write_bytes(b"PK not a zip")
    with pytest.raises(InputError) as err:
        load_dataset(str(target), img_size=8)
    assert culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("n_bins", [17, 32, 256])
def test_pixels_round_trip_to_levels(n_bins):
    levels = torch.arange(n_bins, dtype=torch.uint8).view(1, 1, 1, -1)
    pixels = to_pixels(bin_centres(levels, n_bins), n_bins)
    assert pixels[0, 0, 0, 0] == 0 and pixels[0, 0, 0, -1] == 255
    assert torch.equal(to_levels(pixels, n_bins), levels)


def test_step_batches_are_epochs_of_permutations_sharded_by_rank_and_resume_anywhere():
    whole = StepBatches(10, 4, seed=3)
    stream = [whole.global_batch(k) for k in range(6)]  # 2 full batches per epoch: 3 epochs
    for epoch in range(3):
        seen = torch.cat(stream[2 * epoch:2 * epoch + 2])
        assert seen.unique().numel() == 8 and seen.max() < 10  # no repeats within an epoch
    assert not torch.equal(stream[0], stream[2])  # a new permutation each epoch
    ranks = [StepBatches(10, 4, seed=3, rank=r, world=2, start=1) for r in range(2)]
    shares = [list(itertools.islice(iter(s), 5)) for s in ranks]
    for k in range(5):  # the ranks' shares are the global batch's two halves, in order
        assert shares[0][k] + shares[1][k] == stream[k + 1].tolist()
    resumed = StepBatches(10, 4, seed=3, start=4)
    assert next(iter(resumed)) == stream[4].tolist()
    state = whole.state_dict(5)
    assert (state["epoch"], state["position"]) == (2, 1) and whole.check_state(state, "ckpt") == 5
    with pytest.raises(InputError, match="changed since"):
        StepBatches(12, 4, seed=3).check_state(state, "ckpt")
    with pytest.raises(InputError, match="fewer than --batch"):
        StepBatches(3, 4, seed=0)


def test_device_batch_draws_each_rank_s_share_of_the_global_batch_s_noise():
    levels = torch.randint(0, 32, (4, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    gen = torch.Generator()
    whole = device_batch(levels, 32, gen, seed=7, k=5, global_batch=4)
    shares = [device_batch(levels[2 * r:2 * r + 2], 32, gen, 7, 5, 4, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(shares), whole)  # the same run in one process or two
    assert torch.equal(torch.floor((whole + 0.5) * 32).to(torch.uint8), levels)  # noise within each bin
    assert not torch.equal(device_batch(levels, 32, gen, 7, 6, 4), whole)  # fresh noise at every batch


def test_unreadable_images_are_filled_from_their_batch():
    levels = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1)
    filled, bad = fill_bad(levels, ["", "broken", "", "broken"])
    assert bad == [1, 3] and filled.flatten().tolist() == [0, 2, 2, 0]  # the next sound one, cyclically
    assert levels.flatten().tolist() == [0, 1, 2, 3]  # the loader's batch is left as it was
    with pytest.raises(InputError, match="every image of a batch is unreadable"):
        fill_bad(levels, ["a", "b", "c", "d"])


def test_image_grid_layout():
    grid = image_grid(np.full((5, 3, 4, 6), 200, np.uint8), nrow=3, padding=2, zoom=2)
    assert grid.shape == (3, 2 * (8 + 2) + 2, 3 * (12 + 2) + 2)
    assert grid[:, 0].max() == 0 and grid[:, 2, 2] .min() == 200
