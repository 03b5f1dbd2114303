"""The DataLoader data path in training: exact resume after kill -9 with workers on a folder (one process and
torchrun), unreadable images met mid-epoch skipped and counted, or stopping the run above --max-bad-images."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastglow.app import checkpoint as ckpt_io
from fastglow.app.datasets import split_indices
from fastglow.app.loop import train
from fastglow.app.sampler import StepBatches
from fastglow.testing import (cli_command, cli_env, descendants, metrics_events, run_cli, truncate_image,
                              write_image_folder)

N_IMAGES = 40  # 36 training images: 4 batches of 8 per epoch
FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "8", "--warmup", "2", "--cooldown", "0",
         "--no-progress", "--eval-every", "0", "--img-size", "8", "--log-every", "1", "--threads", "1"]


def _kill_after_checkpoint(cmd: list[str], out, step: int, timeout: float = 120) -> None:
    """Run ``cmd`` and SIGKILL it, its ranks (under torchrun) and their loader workers, all at once, as soon as
    ``out`` holds a checkpoint at ``step`` or later. The resume then starts at once: the folder's lock
    must have ended with the trainers, not with their workers."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not any(s >= step for s, _ in ckpt_io.list_checkpoints(out)):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout} s"
            time.sleep(0.02)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's ranks run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        proc.stderr.close()


def _same_run(a, b) -> None:
    """Two run folders hold the same final weights, optimizer and data state, and the same training metrics."""
    ca = ckpt_io.load_training_checkpoint(ckpt_io.list_checkpoints(a)[0][1])
    cb = ckpt_io.load_training_checkpoint(ckpt_io.list_checkpoints(b)[0][1])
    assert ca["step"] == cb["step"]
    for key in ("model", "optimizer", "data"):
        flat_a, flat_b = _flatten(ca[key]), _flatten(cb[key])
        assert flat_a.keys() == flat_b.keys()
        for name, value in flat_a.items():
            assert torch.equal(value, flat_b[name]) if isinstance(value, torch.Tensor) else value == flat_b[name], \
                f"{key}.{name}"

    def train_lines(out):
        return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in metrics_events(out, "train")]

    assert train_lines(a) == train_lines(b)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix: tree}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, N_IMAGES, size=10)
    return root


def test_folder_with_two_workers_killed_then_resumed_is_bit_identical(tmp_path, folder):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--data", str(folder), *FLAGS, "--workers", "2", "--ckpt-every", "2"]
    assert run_cli("train", "--out", whole, *common, "--steps", "10").returncode == 0
    _kill_after_checkpoint(cli_command() + ["train", "--out", str(split), *common, "--steps", "100000"], split, 4)
    resumed = run_cli("train", "--out", split, *common, "--steps", "10", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics_events(whole, "start")[0]["workers"] == 2
    _same_run(whole, split)
    # the number of loader processes is not part of the run: in-process loading continues it identically
    in_process = tmp_path / "in_process"
    assert run_cli("train", "--out", in_process, *common[:-4], "--workers", "0", "--ckpt-every", "2",
                   "--steps", "10").returncode == 0
    _same_run(whole, in_process)


def test_torchrun_with_workers_killed_then_resumed_is_bit_identical(tmp_path, folder):
    def torchrun(out, steps, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "fastglow", "train", "--out", str(out), "--data", str(folder), *FLAGS, "--workers", "1",
                "--ckpt-every", "2", "--steps", str(steps), *extra]

    whole, split = tmp_path / "whole", tmp_path / "split"
    run = subprocess.run(torchrun(whole, 8), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _kill_after_checkpoint(torchrun(split, 100000), split, 4, timeout=240)
    run = subprocess.run(torchrun(split, 8, "--resume"), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert metrics_events(split, "start")[0]["world_size"] == 2
    _same_run(whole, split)


def _train_positions(n: int = N_IMAGES) -> list[int]:
    return split_indices(n, 0.1, 0)[0].tolist()


def test_an_unreadable_image_mid_epoch_is_skipped_and_counted(tmp_path, folder, capsys):
    files = sorted(folder.glob("*.png"))
    culprit = files[_train_positions()[17]]  # a training image whose header reads: found when first decoded
    truncate_image(culprit)
    out = tmp_path / "run"
    summary = train(dict(out=str(out), data=str(folder), n_flow=2, n_block=2, hidden=8, batch=8, warmup=2,
                         img_size=8, eval_every=0, log_every=1, steps=9, workers=2, max_bad_images=0.05,
                         progress=False))
    assert summary["step"] == 9
    met = [k for k in range(1, 10) if 17 in StepBatches(36, 8, seed=0).global_batch(k)]  # steps that read it
    found = metrics_events(out, "bad_images")
    assert [e["step"] for e in found] == met and all(e["files"] == [str(culprit)] for e in found)
    assert "truncated" in found[0]["reasons"][0] and found[-1]["bad_images_total"] == 1
    lines = metrics_events(out, "train")
    assert lines[-1]["bad_images_total"] == 1 and lines[0]["bad_images_total"] in (0, 1)
    assert all(torch.isfinite(torch.tensor(e["train_bpd"])) for e in lines)
    err = capsys.readouterr().err
    assert err.count("skipped an unreadable image") == 1 and str(culprit) in err
    state = ckpt_io.load_training_checkpoint(ckpt_io.list_checkpoints(out)[0][1])
    assert state["data"]["bad_images"].tolist() == [17]


def test_more_unreadable_images_than_allowed_stop_the_run_keeping_the_newest_checkpoint(tmp_path, folder):
    files = sorted(folder.glob("*.png"))
    order = _train_positions()
    for j in (20, 30):  # two training images
        truncate_image(files[order[j]])
    out = tmp_path / "run"
    run = run_cli("train", "--out", out, "--data", folder, *FLAGS, "--workers", "1", "--ckpt-every", "1",
                  "--steps", "50", "--max-bad-images", "0.03")
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "2 of the 36 training images are unreadable, more than --max-bad-images 0.03" in err[-1]
    assert "last checkpoint: " in err[-1] and err[-1].count("\n") == 0
    stop = metrics_events(out, "stop")[0]
    newest = ckpt_io.list_checkpoints(out)[0]
    assert str(newest[1]) in err[-1] and newest[0] <= stop["step"]
    ckpt_io.load_training_checkpoint(newest[1])  # sound and readable
    totals = [e["bad_images_total"] for e in metrics_events(out, "bad_images")]
    assert totals[-1] == 2 and set(totals[:-1]) == {1}  # the first one met (maybe more than once), then both
