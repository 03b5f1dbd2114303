"""Issue 23, a run's files and numbers: nothing lost, no silently wrong answers (items 1, 3, 4, 8, 9). Each CLI
case runs the real ``fastglow`` command in a subprocess."""

import json

import pytest

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
    import torch
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
