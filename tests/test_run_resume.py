"""A run's files and numbers across resumes: nothing lost, no silently wrong answers (items 1, 3, 4, 8, 9 of
issue 23). Each CLI case runs the real ``fastglow`` command in a subprocess."""

import json

import pytest
import torch

from fastglow.app import checkpoint as ckpt_io
from fastglow.app import loop
from fastglow.app.cli import main
from fastglow.app.loop import train
from fastglow.testing import assert_one_line_error, folder_state, run_cli

TINY = dict(n_flow=2, n_block=2, hidden=8, batch=16, warmup=2, cooldown=0, eval_every=0, progress=False)
TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--warmup", "2",
              "--cooldown", "0", "--no-progress", "--eval-every", "0"]


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_item1_resume_of_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = loop.train_step

    def ctrl_c_at_step_3(state):
        if state.step == 2:
            raise KeyboardInterrupt
        return real_step(state)

    monkeypatch.setattr(loop, "train_step", ctrl_c_at_step_3)
    argv = ["train", "--out", out, *TINY_FLAGS, "--steps", "4", "--log-every", "1", "--resume"]
    assert main([str(a) for a in argv]) == 130  # "interrupted (continue with --resume)"
    monkeypatch.undo()
    before = folder_state(out)
    assert "metrics.jsonl" in before and not ckpt_io.list_checkpoints(out)

    run = run_cli(*argv)  # the same command again, as `make demo` does
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if "earlier" in x]
    assert "no checkpoint to resume" in line and "starting a new run" in line
    (aside,) = out.glob("earlier-run-*")
    assert folder_state(aside) == before  # the interrupted run's log, byte for byte
    assert [e["step"] for e in _events(out) if e["event"] == "train"] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    train(dict(TINY, out=str(out), steps=3))
    ckpt = ckpt_io.list_checkpoints(out)[0][1]
    bare = out / "bare.pt"
    torch.save(ckpt_io.load_training_checkpoint(ckpt)["model"], bare)  # rosinality-style: weights only
    return out, ckpt, bare


def test_item2_a_bare_state_dict_takes_the_data_sets_bin_count(digits_run, tmp_path):
    out, ckpt, bare = digits_run
    full, weights = (run_cli("eval", "--ckpt", path, "--data", "digits", "--split", "all") for path in (ckpt, bare))
    assert full.returncode == weights.returncode == 0, (full.stderr, weights.stderr)
    assert full.stdout.split()[2] == weights.stdout.split()[2]  # bits/dim of the same weights, same 17 levels
    grids = [tmp_path / "full.png", tmp_path / "bare.png"]
    for path, grid in zip((ckpt, bare), grids):
        assert run_cli("sample", "--ckpt", path, "--data", "digits", "--n", "4", "--out", grid).returncode == 0
    assert grids[0].read_bytes() == grids[1].read_bytes()  # pixels mapped with the same 17 levels
    run = run_cli("eval", "--ckpt", bare, "--data", "digits", "--n-bits", "5")
    assert_one_line_error(run, "--n-bits", "17 levels")


def _grey_folder(root, n, size=8, seed=0, mode="L"):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"img_{i:03d}.png")
    return root


FOLDER_FLAGS = ["--img-size", "8", "--n-flow", "1", "--n-block", "2", "--hidden", "4", "--batch", "4",
                "--no-progress", "--eval-every", "0", "--test-fraction", "0.1"]


def test_item3_eval_keeps_the_held_out_images_of_the_run_when_the_folder_changes(tmp_path):
    data, out = _grey_folder(tmp_path / "data", 30), tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *FOLDER_FLAGS, "--steps", "2"]) == 0
    ckpt = ckpt_io.list_checkpoints(out)[0][1]
    held_out = ckpt_io.load_training_checkpoint(ckpt)["dataset"]["test"]
    assert len(held_out) == 3 and all(name.startswith("img_") for name in held_out)
    before = run_cli("eval", "--ckpt", ckpt)
    assert before.returncode == 0 and "test bits/dim" in before.stdout and "on 3 images" in before.stdout
    assert before.stderr == ""

    _grey_folder(tmp_path / "more", 1, seed=7)
    (tmp_path / "more" / "img_000.png").rename(data / "img_0005.png")  # sorts among the first ones
    after = run_cli("eval", "--ckpt", ckpt)
    assert after.returncode == 0 and after.stdout == before.stdout  # the same 3 images, the same number
    warning = after.stderr.strip()
    assert len(warning.splitlines()) == 1 and "changed since training" in warning and "31 images" in warning

    other = run_cli("sample", "--ckpt", ckpt, "--data", "digits", "--out", tmp_path / "s.png")  # item 2
    assert_one_line_error(other, "32 levels", "the digits have 17")

    inside = run_cli("train", "--data", data, "--out", data / "runs", *FOLDER_FLAGS, "--steps", "2")
    assert_one_line_error(inside, "inside --data")
    assert not (data / "runs").exists()


def test_item4_resume_on_other_data_of_the_same_size_is_refused(tmp_path):
    data, out = _grey_folder(tmp_path / "data", 20), tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *FOLDER_FLAGS, "--steps", "2"]) == 0
    before = folder_state(out)
    for path in data.iterdir():
        path.unlink()
    _grey_folder(data, 20, size=16, seed=1, mode="RGB")  # same names and count: RGB 16x16 instead of grey 8x8
    run = run_cli("train", "--data", data, "--out", out, *FOLDER_FLAGS, "--steps", "4", "--resume")
    assert_one_line_error(run, "data set changed", "step_00000002.pt")
    assert folder_state(out) == before


def test_item7_classes_are_the_labels_present_and_empty_class_folders_are_named(tmp_path):
    import numpy as np
    from PIL import Image

    npz, out = tmp_path / "d.npz", tmp_path / "run"
    images = np.random.default_rng(0).integers(0, 256, (24, 8, 8), dtype=np.uint8)
    np.savez(npz, images=images, labels=np.array([0, 1, 1000] * 8))
    flags = ["--conditional", "--data", npz, "--out", out, *FOLDER_FLAGS, "--test-fraction", "0.25",
             "--steps", "1"]
    assert run_cli("train", *flags).returncode == 0
    ckpt = ckpt_io.list_checkpoints(out)[0][1]
    saved = ckpt_io.load_training_checkpoint(ckpt)
    assert saved["config"]["class_names"] == ["0", "1", "1000"] and saved["config"]["n_classes"] == 3
    assert saved["model"]["class_prior.weight"].shape[1] == 3  # not a 1001-class model
    run = run_cli("sample", "--ckpt", ckpt, "--class", "1000", "--n", "2", "--out", tmp_path / "s.png")
    assert run.returncode == 0, run.stderr

    folder = tmp_path / "classes"
    for name in ("cat", "dog", "empty"):
        (folder / name).mkdir(parents=True)
    for k, name in enumerate(("cat", "dog") * 10):
        Image.fromarray(images[k]).save(folder / name / f"{k}.png")
    run = run_cli("train", "--conditional", "--data", folder, "--out", tmp_path / "run2", *FOLDER_FLAGS,
                  "--steps", "1")
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if "warning" in x]
    assert "empty" in line and "not classes" in line


def _records(out):
    """metrics.jsonl's train and eval records without their timings."""
    drop = {"elapsed_s", "sample"}  # timings; the grid's path (a file of the same name in either folder)
    return [{k: v for k, v in e.items() if k not in drop} for e in _events(out) if e["event"] in ("train", "eval")]


def test_item8_metrics_are_identical_after_a_resume_and_a_finished_run_is_left_alone(tmp_path, monkeypatch):
    flags = [*TINY_FLAGS, "--steps", "12", "--ckpt-every", "7", "--log-every", "5", "--no-reversible",
             "--threads", "1"]  # the subprocess's count: float sums depend on it
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(whole), *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    real_step = loop.train_step

    def killed_after_step_7(state):
        if state.step == 7:
            raise KeyboardInterrupt
        return real_step(state)

    monkeypatch.setattr(loop, "train_step", killed_after_step_7)
    try:
        assert main(["train", "--out", str(cut), *flags]) == 130
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    assert run_cli("train", "--out", cut, *flags, "--resume").returncode == 0
    assert _records(cut) == _records(whole)  # train_bpd at step 10 averages steps 6..10 in both

    before = folder_state(cut)
    again = run_cli("train", "--out", cut, *flags, "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert folder_state(cut) == before  # no eval line appended, no grid redrawn
    assert "test bits/dim" in again.stdout
