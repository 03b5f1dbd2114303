"""Value types of the ``fastglow`` command's flags: each turns the text into a value or refuses it with a
one-line argparse error (exit 2), before any work starts."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def channels(text: str):
    if text == "auto":
        return None
    if text not in ("1", "3"):
        raise argparse.ArgumentTypeError(f"must be 1, 3 or auto, got {text}")
    return int(text)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def learning_rate(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


MAX_TEMPERATURE = 10.0  # latents are N(0, T^2): far above 1 they only saturate every pixel, or overflow


def temperature(text: str) -> float:
    value = finite(text)
    if not 0 <= value <= MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_TEMPERATURE:g}], got {text}")
    return value


def n_bits(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be in 1..8, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


MAX_SEED = 2 ** 32 - 1  # numpy's seeds are 32-bit; torch's and Python's take these too


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {value}")
    return value


def threads(text: str) -> int:
    """1 .. the number of CPUs this process may run on (more threads than cores only contend)."""
    value = positive_int(text)
    cores = available_cpus()
    if value > cores:
        raise argparse.ArgumentTypeError(f"must be at most {cores}, the CPUs available here, got {value}")
    return value


def available_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(steady: bool) -> int:
    """Torch's thread count when --threads is not given: its own default within the CPUs this process may use;
    unless ``steady`` (training: a resume must compute alike) or OMP_NUM_THREADS is set, also less the machine's
    1-minute load average, so that a shared machine is not oversubscribed; at least 1."""
    import os

    import torch

    threads = min(torch.get_num_threads(), available_cpus())
    if not steady and hasattr(os, "getloadavg") and "OMP_NUM_THREADS" not in os.environ:
        threads = min(threads, available_cpus() - int(os.getloadavg()[0]))
    return max(1, threads)


def run_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def png_file(text: str) -> str:
    """A file name ending in .png (what fastglow writes), not an existing folder."""
    import os

    if not text.strip():
        raise argparse.ArgumentTypeError("must name a .png file, got an empty string")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a .png file")
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"fastglow writes PNG images; name the file .png, got {text}")
    return text
