"""A run's files: nothing is lost to corrupt or foreign checkpoints, a diverging run, or a second
trainer on the same folder. Each case runs the real ``fastglow`` command in a subprocess."""

import json
import math
import signal
import subprocess
import time

import pytest
import torch

from fastglow import reference
from fastglow.app import checkpoint as ckpt_io
from fastglow.app import loop
from fastglow.app.cli import main
from fastglow.app.errors import TrainingError
from fastglow.app.loop import train
from fastglow.testing import assert_one_line_error, cli_command, cli_env, folder_state, run_cli

TINY = dict(n_flow=2, n_block=2, hidden=8, batch=16, warmup=2, cooldown=0, eval_every=0, progress=False)
TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--warmup", "2",
              "--cooldown", "0", "--no-progress", "--eval-every", "0"]


def _steps(out):
    return [step for step, _ in ckpt_io.list_checkpoints(out)]


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_item1_resume_over_only_corrupt_checkpoints_refuses_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    train(dict(TINY, out=str(out), steps=4, ckpt_every=2))
    for _, path in ckpt_io.list_checkpoints(out):  # a full disk truncated both
        path.write_bytes(path.read_bytes()[:1500])
    before = folder_state(out)
    for start in (["--resume"], []):
        run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "8", *start)
        assert_one_line_error(run, "step_00000002.pt", "step_00000004.pt", "--new-run")
        assert folder_state(out) == before

    assert main(["train", "--out", str(out), *TINY_FLAGS, "--steps", "3", "--keep", "1", "--new-run"]) == 0
    (aside,) = out.glob("earlier-run-*")
    assert folder_state(aside) == before  # every earlier file moved, byte for byte
    assert _steps(out) == [3] and [e["event"] for e in _events(out)][0] == "start"


def test_item1_a_run_without_checkpoints_is_not_restarted_silently(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"event": "train", "step": 10}\n')
    before = folder_state(out)
    run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "2")  # with --resume: issue 23, item 1
    assert_one_line_error(run, "metrics.jsonl", "--new-run")
    assert folder_state(out) == before


def test_item2_rotation_counts_and_deletes_only_this_runs_readable_checkpoints(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    train(dict(TINY, out=str(out), steps=2, ckpt_every=1, keep=2))
    train(dict(TINY, out=str(other), steps=1, ckpt_every=1))
    folder = out / "checkpoints"
    (folder / "step_00000090.pt").write_bytes(b"\x00garbage" * 100)  # unreadable
    torch.save(reference.Glow(1, 2, 2, hidden_channels=8).state_dict(), folder / "step_00000091.pt")  # foreign
    (folder / "step_00000000.pt").write_bytes((other / "checkpoints" / "step_00000001.pt").read_bytes())
    planted = {name: (folder / name).read_bytes() for name in ("step_00000000.pt", "step_00000090.pt",
                                                               "step_00000091.pt")}
    run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "5", "--ckpt-every", "1", "--keep", "2",
                  "--resume")
    assert run.returncode == 0, run.stderr
    assert {name: (folder / name).read_bytes() for name in planted} == planted
    assert _steps(out) == [91, 90, 5, 4, 0]  # this run's newest two, and everything that is not this run's
    assert ckpt_io.load_training_checkpoint(folder / "step_00000005.pt")["step"] == 5


def _assert_sound(ckpt, capsys):
    """The checkpoint loads, its weights are finite, and eval / sample on it succeed (in this process)."""
    state = ckpt_io.load_training_checkpoint(ckpt)["model"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ckpt)]) == 0
    assert math.isfinite(float(capsys.readouterr().out.split()[2]))
    assert main(["sample", "--ckpt", str(ckpt), "--n", "4", "--out", str(ckpt.parent / "s.png")]) == 0


def test_item3_diverging_run_stops_in_one_line_and_keeps_its_last_sound_weights(tmp_path, capsys):
    # the command (default model): before the fix, a LinAlgError traceback from the sample grid
    out = tmp_path / "run"
    run = run_cli("train", "--out", out, "--steps", "60", "--lr", "1e3", "--warmup", "0", "--eval-every", "5",
                  "--no-reversible", "--seed", "1", "--no-progress", "--device", "cpu")
    err = assert_one_line_error(run, "last checkpoint", code=1)
    steps = _steps(out)
    assert steps and f"step_{steps[0]:08d}.pt" in err
    _assert_sound(ckpt_io.list_checkpoints(out)[0][1], capsys)
    assert _events(out)[-1]["event"] == "stop"


def test_item3_the_kept_state_is_exactly_the_newest_one_whose_loss_was_finite(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(dict(TINY, out=str(whole), steps=3))
    real_loss, calls = loop.training_loss, []

    def loss_nan_from_step_5(model, x, n_bins, y=None):
        calls.append(1)
        return real_loss(model, x, n_bins, y) * (float("nan") if len(calls) >= 5 else 1.0)

    monkeypatch.setattr(loop, "training_loss", loss_nan_from_step_5)
    diverged = tmp_path / "diverged"
    with pytest.raises(TrainingError, match="step_00000003.pt"):
        train(dict(TINY, out=str(diverged), steps=20, max_bad_steps=1))
    # the loss at the weights after step 4 was NaN: the state kept is the one after step 3, as a run of 3 steps
    kept, reference_state = (ckpt_io.load_training_checkpoint(p) for p in (
        diverged / "checkpoints" / "step_00000003.pt", whole / "checkpoints" / "step_00000003.pt"))
    for key in ("model", "data"):
        torch.testing.assert_close(kept[key], reference_state[key], rtol=0, atol=0)
    torch.testing.assert_close(kept["optimizer"]["state"], reference_state["optimizer"]["state"], rtol=0, atol=0)
    torch.testing.assert_close(kept["rng"], reference_state["rng"], rtol=0, atol=0)  # data order: "data" above
    assert kept["step"] == 3 and _steps(diverged) == [3]


def test_item4_no_checkpoint_of_exploded_weights_and_bad_checkpoints_say_so(tmp_path, capsys):
    out = tmp_path / "run"
    run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "30", "--lr", "1e3", "--warmup", "0",
                  "--ckpt-every", "1", "--device", "cpu")
    assert_one_line_error(run, "unfit to keep", code=1)
    found = ckpt_io.list_checkpoints(out)
    assert found  # the last state whose loss was finite, before the exploded update
    for _, path in found:
        _assert_sound(path, capsys)

    good = ckpt_io.load_training_checkpoint(found[0][1])
    exploded = tmp_path / "exploded.pt"
    bad = {**good, "model": {k: v * 1e30 if k.endswith("actnorm.scale") else v for k, v in good["model"].items()}}
    torch.save(bad, exploded)  # finite weights, non-finite loss
    singular = tmp_path / "singular.pt"
    torch.save({**good, "model": {**good["model"], "blocks.0.flows.0.invconv.w_s":
                                  torch.full_like(good["model"]["blocks.0.flows.0.invconv.w_s"], -200.0)}},
               singular)
    assert_one_line_error(run_cli("eval", "--ckpt", exploded), exploded, "unusable")
    assert_one_line_error(run_cli("sample", "--ckpt", singular, "--out", tmp_path / "s.png"), singular, "unusable")
    assert not (tmp_path / "s.png").exists()


def test_item8_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*cli_command(), "train", "--out", str(out), *TINY_FLAGS, "--steps", "100000",
                              "--ckpt-every", "2", "--log-every", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not _steps(out):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "10", "--resume")
        assert_one_line_error(run, f"PID {first.pid}")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
        first.stderr.close()
    steps = [e["step"] for e in _events(out) if e["event"] == "train"]
    assert len(steps) == len(set(steps))  # one writer: no step logged twice
    newest = _steps(out)[0]
    assert train(dict(out=str(out), steps=newest + 1, resume=True))["step"] == newest + 1  # the kill freed it
