"""The command line: bad flags, devices, backends and files end in one line on stderr (exit 2),
never a traceback, before any work; progress goes to log files as lines."""

import pickle
import subprocess
import sys

import pytest
import torch

from fastglow.app import loop
from fastglow.app.cli import main
from fastglow.app.config import TrainConfig
from fastglow.app.loop import train
from fastglow.testing import assert_one_line_error, cli_env, run_cli

TINY = dict(n_flow=2, n_block=2, hidden=8, batch=16, warmup=2, cooldown=0, eval_every=0, progress=False)
TINY_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--no-progress",
              "--eval-every", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(dict(TINY, out=str(out), steps=2))
    return next((out / "checkpoints").glob("step_*.pt"))


def test_item5_bad_temperature_is_refused_before_any_work(tmp_path, ckpt):
    out = tmp_path / "run"
    for value in ("nan", "1e30"):
        run = run_cli("train", "--out", out, *TINY_FLAGS, "--temperature", value)
        assert_one_line_error(run, "--temperature", value)
        assert not out.exists()
    run = run_cli("sample", "--ckpt", ckpt, "--temperature", "nan", "--out", tmp_path / "s.png")
    assert_one_line_error(run, "--temperature", "nan")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "nan"], ["train", "--lr", "-1"], ["train", "--lr", "0"], ["train", "--lr", "inf"],
    ["train", "--temperature", "-0.5"], ["train", "--temperature", "inf"], ["train", "--n-bits", "0"],
    ["train", "--n-bits", "9"], ["train", "--test-fraction", "nan"], ["sample", "--ckpt", "x", "--n-bits", "-1"],
    ["sample", "--ckpt", "x", "--temperature", "1e30"], ["train", "--resume", "--new-run"],
])
def test_item5_numeric_flags_are_validated_in_one_line(argv, capsys, tmp_path):
    tiny = [*TINY_FLAGS, "--steps", "1"] if argv[0] == "train" else []  # were they accepted: a short run
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *tiny, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and argv[-2] in err, err
    assert not (tmp_path / "out").exists()


def test_item6_device_and_backend_errors_are_one_line(tmp_path, ckpt):
    out = tmp_path / "run"
    no_interpreter = cli_env({"TRITON_INTERPRET": "0"})  # a CPU-only machine as users have it
    for flags, names in ((["--device", "foo"], ["--device foo"]), (["--device", "meta"], ["--device meta"]),
                         (["--device", "cpu", "--backend", "triton"], ["--backend triton", "cpu"])):
        run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "2", *flags, env=no_interpreter)
        assert_one_line_error(run, *names)
    run = run_cli("sample", "--ckpt", ckpt, "--device", "cpu", "--backend", "triton", "--out", tmp_path / "s.png",
                  env=no_interpreter)
    assert_one_line_error(run, "--backend triton")


def test_item6_garbage_in_metrics_log_then_resume(tmp_path):
    out = tmp_path / "run"
    train(dict(TINY, out=str(out), steps=2, ckpt_every=1))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\x9c\n[1, 2]\n{\"event\": \"train\", \"step\": \"x\"}\n")
    run = run_cli("train", "--out", out, *TINY_FLAGS, "--steps", "3", "--resume")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    events = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert '"event": "start"' in events[0] and '"event": "done"' in events[-1]


def test_item9_random_bytes_checkpoint_gets_our_message_without_unsafe_advice(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)  # a pickle header, then noise
    objects = tmp_path / "objects.pt"
    objects.write_bytes(pickle.dumps({"model": object}, protocol=4))
    for path in (noise, objects):
        run = run_cli("sample", "--ckpt", path, "--out", tmp_path / "s.png")
        err = assert_one_line_error(run, path, "not a fastglow/rosinality checkpoint")
        assert "weights_only" not in err and "trusted" not in err


def test_item10_progress_is_written_as_lines_when_stderr_is_not_a_terminal(tmp_path):
    run = run_cli("train", "--out", tmp_path / "run", "--n-flow", "2", "--n-block", "2", "--hidden", "8",
                  "--batch", "16", "--eval-every", "0", "--steps", "3")
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "train: step 3/3 (100%)" in run.stderr
    assert all(len(line) < 200 for line in run.stderr.splitlines())


def test_item10_default_cooldown_is_half_of_the_steps():
    short = TrainConfig(lr=1.0, warmup=0, steps=30)
    lrs = [loop.learning_rate(short, t) for t in range(1, 31)]
    assert lrs[:16] == [1.0] * 16 and lrs[-1] == pytest.approx(1 / 15)  # not starved: lr 1 for half the run
    long, explicit = TrainConfig(lr=1.0, steps=2000), TrainConfig(lr=1.0, steps=2000, cooldown=1000)
    assert all(loop.learning_rate(long, t) == loop.learning_rate(explicit, t) for t in range(1, 2001, 7))
    assert torch.tensor(lrs).min() > 0


def test_the_command_line_without_its_extra_names_it_in_one_line():
    """`pip install fastglow` alone (no [app]): the console script says what to install, before any work."""
    code = ("import sys; sys.modules['sklearn'] = None; from fastglow.app.cli import main; "
            "sys.exit(main(['train', '--data', 'digits']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "fastglow: the command line needs scikit-learn: pip install 'fastglow[app]'"], proc.stderr
