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
