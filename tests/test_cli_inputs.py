"""The command line: tracebacks and out-of-memory kills become one line and exit 2 before any work
(items 5, 6, 9, 11, 12). Each case runs the real ``fastglow`` command in a subprocess."""

import numpy as np
import pytest
from PIL import Image

from fastglow.app import checkpoint as ckpt_io
from fastglow.app.loop import train
from fastglow.testing import assert_one_line_error, folder_state, run_cli

TINY = dict(n_flow=1, n_block=2, hidden=4, batch=16, warmup=1, cooldown=0, eval_every=0, progress=False)
TINY_FLAGS = ["--n-flow", "1", "--n-block", "2", "--hidden", "4", "--batch", "16", "--no-progress",
              "--eval-every", "0", "--steps", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A one-step class-conditional digits checkpoint (sample, interpolate and morph all take it)."""
    out = tmp_path_factory.mktemp("run")
    train(dict(TINY, out=str(out), steps=1, conditional=True))
    return ckpt_io.list_checkpoints(out)[0][1]


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    paths = [folder / f"{k}.png" for k in range(2)]
    for k, path in enumerate(paths):
        Image.fromarray(np.full((8, 8), 60 * k, np.uint8)).save(path)
    return paths


def _npy_files(tmp_path):
    images = np.zeros((20, 8, 8), np.uint8)
    np.save(tmp_path / "plain.npy", images)
    (tmp_path / "renamed.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    return tmp_path / "plain.npy", tmp_path / "renamed.npz"


@pytest.mark.parametrize("argv,names", [
    (["train", "--seed", "-1"], ["--seed", "-1"]),
    (["train", "--seed", "4294967296"], ["--seed", "4294967296"]),
    (["train", "--split-seed", "99999999999999999999999"], ["--split-seed"]),
    (["train", "--threads", "100000"], ["--threads", "100000"]),
    (["train", "--out", ""], ["--out"]),
    (["train", "--zoom", "100000"], ["--zoom", "GiB"]),
    (["sample", "--seed", "99999999999999999999999"], ["--seed"]),
    (["sample", "--out", ""], ["--out"]),
    (["sample", "--n", "100000000"], ["--n", "GiB"]),  # item 6: was an out-of-memory kill
    (["interpolate", "--steps", "1000000000"], ["--steps", "GiB"]),
    (["morph", "--from", "3", "--to", "8", "--steps", "100000000"], ["--steps", "GiB"]),  # item 6
])
def test_items5_6_bad_sizes_and_seeds_are_one_line_before_any_work(argv, names, ckpt, digit_pngs, tmp_path):
    out = tmp_path / "out"
    if argv[0] == "train":
        extra = [*TINY_FLAGS, *([] if "--out" in argv else ["--out", out])]
    else:
        extra = ["--ckpt", ckpt, *digit_pngs] if argv[0] == "interpolate" else ["--ckpt", ckpt]
        extra += [] if "--out" in argv else ["--out", out / "x.png"]
    run = run_cli(*argv, *extra, timeout=120)
    assert_one_line_error(run, *names)
    assert not (out / "x.png").exists() and not ckpt_io.list_checkpoints(out)


def test_item5_npy_arrays_given_as_data_train(tmp_path):
    # were a TypeError traceback; since issue 21 an .npy is a memory-mapped data set, under either name
    for path in _npy_files(tmp_path):
        run = run_cli("train", "--data", path, "--out", tmp_path / path.stem, *TINY_FLAGS)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr


def test_item6_many_samples_are_decoded_in_batches(ckpt, tmp_path):
    out = tmp_path / "many.png"
    run = run_cli("sample", "--ckpt", ckpt, "--n", "300", "--out", out)  # 5 decode batches of <= 64
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (18 * 10 + 2, 17 * 10 + 2)  # 18 per row, 17 rows of 8+2 pixels
    assert folder_state(tmp_path).keys() == {"many.png"}


def test_item9_outputs_refused_leave_nothing_behind(ckpt, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("mine")
    before = folder_state(tmp_path)
    for out, names in ((tmp_path / "runs", ["runs", "folder"]), (tmp_path / "x.jpg", ["x.jpg", ".png"])):
        assert_one_line_error(run_cli("sample", "--ckpt", ckpt, "--n", "2", "--out", out), *names)
        assert folder_state(tmp_path) == before  # no .runs.tmp, no PNG bytes in a .jpg
    new = tmp_path / "new"
    run = run_cli("train", "--data", tmp_path / "missing", "--out", new, *TINY_FLAGS)
    assert_one_line_error(run, "missing")
    assert not new.exists()  # a refused run leaves no empty --out folder
    assert folder_state(tmp_path) == before


def test_item11_messages_name_the_problem(ckpt, tmp_path, monkeypatch, capsys):
    import errno

    import torch

    from fastglow.app import data
    from fastglow.app.cli import main

    state = dict(ckpt_io.load_training_checkpoint(ckpt)["model"])
    del state["classifier.bias"]
    torch.save(state, tmp_path / "cut.pt")
    run = run_cli("sample", "--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "s.png")
    assert_one_line_error(run, "cut.pt", "Missing key(s)", "classifier.bias")  # the detail, not only a header
    run = run_cli("eval", "--ckpt", ckpt, "--n-bits", "8")
    err = assert_one_line_error(run, "digits' 17 levels", "--n-bits 8")
    assert "None" not in err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_one_line_error(run_cli("train", "--out", afile, *TINY_FLAGS), "afile", "is a file")
    assert afile.read_text() == "mine"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name

    monkeypatch.setattr(data, "save_image_grid", disk_full)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(ckpt), "--n", "2", "--out", str(tmp_path / "full.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "full.png" in err and len(err.splitlines()) == 1


def test_item12_every_command_takes_threads_and_names_itself_in_usage_errors(ckpt, tmp_path):
    run = run_cli("eval", "--ckpt", ckpt, "--threads", "1", "--batch", "64")
    assert run.returncode == 0 and "test bits/dim" in run.stdout, run.stderr
    run = run_cli("sample", "--ckpt", ckpt, "--threads", "1", "--n", "2", "--out", tmp_path / "s.png")
    assert run.returncode == 0, run.stderr
    for command, required in (("eval", []), ("sample", []), ("morph", ["--from", "3", "--to", "8"])):
        run = run_cli(command, "--ckpt", ckpt, *required, "--bogus", "1")
        err = assert_one_line_error(run, "--bogus")
        assert err.startswith(f"fastglow {command}: error: unrecognized arguments"), err


def test_item12_default_threads_leave_a_loaded_machine_alone(monkeypatch):
    import os

    import torch

    from fastglow.app import flags

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(flags, "available_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 6.0, 6.0))
    assert flags.default_threads(steady=False) == 2  # 8 CPUs, 6 busy with other work
    assert flags.default_threads(steady=True) == 8  # training: the same count on a resume, whatever the load
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert flags.default_threads(steady=False) == 1
    monkeypatch.setattr(flags, "available_cpus", lambda: 2)
    assert flags.default_threads(steady=True) == 2  # never more than the CPUs this process may use


def test_item12_main_leaves_the_callers_thread_count_alone(ckpt, tmp_path):
    import torch

    from fastglow.app.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the --threads below (a test worker may run with 1 thread)
    try:
        out = str(tmp_path / "s.png")
        assert main(["sample", "--ckpt", str(ckpt), "--n", "2", "--threads", "1", "--out", out]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
