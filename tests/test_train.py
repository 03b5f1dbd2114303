"""The training loop: resume bit-identically, survive SIGKILL, skip non-finite steps, run under torchrun."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastglow import reference
from fastglow.app import checkpoint as ckpt_io
from fastglow.app import loop
from fastglow.app.cli import main
from fastglow.app.config import TrainConfig
from fastglow.app.errors import InputError
from fastglow.app.loop import train

# cooldown 0: the lr schedule does not depend on --steps, so a run cut at step 3 and extended to 6 is the same run
TINY = dict(n_flow=2, n_block=2, hidden=8, batch=16, warmup=2, cooldown=0, eval_every=0, progress=False)
TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--warmup", "2",
              "--cooldown", "0", "--no-progress", "--eval-every", "0"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _events(out, kind=None):
    lines = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return [e for e in lines if kind is None or e["event"] == kind]


def _final_state(out):
    path = ckpt_io.list_checkpoints(out)[0][1]
    return ckpt_io.load_training_checkpoint(path)


def _assert_tensors_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_learning_rate_warms_up_then_cools_down_linearly():
    cfg = TrainConfig(lr=1.0, warmup=4, cooldown=5, steps=20)
    lrs = [loop.learning_rate(cfg, t) for t in range(1, 21)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and lrs[-5:] == [1.0, 0.8, 0.6, 0.4, 0.2]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(dict(TINY, out=str(whole), steps=6, ckpt_every=3))
    train(dict(TINY, out=str(split), steps=3, ckpt_every=3))
    summary = train(dict(out=str(split), steps=6, resume=True, progress=False))
    assert summary["step"] == 6
    a, b = _final_state(whole), _final_state(split)
    assert a["step"] == b["step"] == 6
    _assert_tensors_equal(a["model"], b["model"], "model")
    _assert_tensors_equal(a["optimizer"], b["optimizer"], "optimizer")
    _assert_tensors_equal(a["data"], b["data"], "data")
    _assert_tensors_equal(a["rng"], b["rng"], "rng")
    assert [e["event"] for e in _events(split)].count("resume") == 1
    # the checkpoint's model loads into rosinality's module tree (the reference) as-is
    reference.Glow(1, 2, 2, hidden_channels=8).load_state_dict(a["model"])


def test_resume_refuses_other_run_settings_and_reuse_of_out(tmp_path):
    train(dict(TINY, out=str(tmp_path), steps=2))
    with pytest.raises(InputError, match="already holds checkpoints"):
        train(dict(TINY, out=str(tmp_path), steps=2))
    with pytest.raises(InputError, match="n_flow"):
        train(dict(out=str(tmp_path), steps=4, n_flow=3, resume=True))


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    train(dict(TINY, out=str(tmp_path), steps=4, ckpt_every=2))
    newest = ckpt_io.list_checkpoints(tmp_path)[0][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "checkpoints" / ".step_00000006.pt.abc.tmp").write_bytes(b"half a file")
    summary = train(dict(out=str(tmp_path), steps=5, resume=True))
    assert summary["step"] == 5
    assert _events(tmp_path, "resume")[0]["step"] == 2
    assert newest.name in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    real_loss, calls = loop.training_loss, []

    def flaky_loss(model, x, n_bins, y=None):  # non-finite on steps 3 and 4, and from step 7 on
        calls.append(1)
        loss = real_loss(model, x, n_bins, y)
        bad = len(calls) in (3, 4) or len(calls) >= 7
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(loop, "training_loss", flaky_loss)
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), *TINY_FLAGS, "--steps", "20", "--ckpt-every", "2",
               "--max-bad-steps", "3", "--log-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "non-finite for 3 consecutive steps (7..9)" in err[0]
    skips = _events(out, "skip")
    assert [e["step"] for e in skips] == [3, 4, 7, 8, 9] and skips[-1]["consecutive"] == 3
    state = _final_state(out)  # step 8 (skipped steps do not touch the weights): every weight finite
    assert state["step"] == 8 and state["skipped"] == 4 and "step_00000008.pt" in err[0]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert all(torch.isfinite(torch.tensor(e["train_bpd"])) for e in _events(out, "train"))


def test_sigkill_mid_run_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastglow", "train", "--out", str(out), *TINY_FLAGS, "--steps", "100000",
           "--ckpt-every", "2", "--keep", "2", "--log-every", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(step >= 8 for step, _ in ckpt_io.list_checkpoints(out)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint at step 8 within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    logged = max(e["step"] for e in _events(out, "train"))
    found = ckpt_io.list_checkpoints(out)
    assert 1 <= len(found) <= 2 + 1  # keep=2 (+1 if killed between a write and the pruning)
    for _, path in found:
        ckpt_io.load_training_checkpoint(path)  # every finished file loads: none is corrupt
    newest = found[0][0]
    assert logged - newest <= 2  # lost at most the steps since the last checkpoint (ckpt every 2)
    summary = train(dict(out=str(out), steps=newest + 3, resume=True))
    assert summary["step"] == newest + 3
    events = _events(out)
    assert events[[e["event"] for e in events].index("resume")]["step"] == newest
    assert max(e["step"] for e in events if e["event"] == "train") == newest + 3
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_torchrun_two_gloo_processes_stay_identical(tmp_path):
    """DDP over the reversible levels' custom autograd.Function (the case that could break); plain autograd
    (--no-reversible) runs the same code path and passes too, it is left out to keep the suite short."""
    out = tmp_path / "ddp"
    flags = ["--out", str(out), *TINY_FLAGS, "--steps", "6", "--eval-every", "3", "--ckpt-every", "6",
             "--reversible"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastglow", "train", *flags]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test bits/dim") == 1  # rank 0 reports, rank 1 stays quiet
    assert _events(out, "start")[0]["world_size"] == 2
    evals = _events(out, "eval")
    assert [e["step"] for e in evals] == [3, 6] and all(e["ranks_in_sync"] for e in evals)
    # the same global batches and noise in one process: the same run up to float rounding
    single = tmp_path / "single"
    summary = train(dict(TINY, out=str(single), steps=6, ckpt_every=6, reversible=True))
    ddp_state, one_state = _final_state(out)["model"], _final_state(single)["model"]
    for key, value in one_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert math.isclose(evals[-1]["test_bpd"], summary["test_bpd"], rel_tol=1e-6)
