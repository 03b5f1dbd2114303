"""The ``fastglow`` command."""

import subprocess
import sys

import fastglow
from fastglow.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "fastglow", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fastglow {fastglow.__version__}"
    out = subprocess.run([sys.executable, "-m", "fastglow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


def test_demo_runs_on_embedded_digits(capsys):
    assert main(["demo", "--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out
    err = float(out.split("reconstruction error:")[1].split()[0])
    assert err < 1e-5
