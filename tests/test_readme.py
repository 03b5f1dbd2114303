"""README.md runs as written: every code block, in order, at tiny sizes (as the README says).

Python blocks run in one namespace with ``fastglow.Glow`` at K <= 2, width 8. Command lines run through the
``fastglow`` command (in this process; torchrun in its own processes, 2 of them) with tiny training flags
appended (later flags win), ``IMAGES`` a generated folder of 256x256 images and a run's
``step_00002000.pt`` its newest checkpoint; ``make`` lines are dry runs (``make -n``: the targets exist and
expand). The layout block names files and folders that exist.
"""

import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastglow
from fastglow.app.cli import main
from fastglow.testing import cli_env

ROOT = Path(__file__).parents[1]
TINY_TRAIN = ["--steps", "2", "--n-flow", "1", "--hidden", "4", "--batch", "8", "--warmup", "1", "--eval-every",
              "0", "--n-sample", "4", "--no-progress"]


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of README.md, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def _command_lines(text: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [" ".join(shlex.quote(a) for a in words) for words in lines if words]


def test_the_readme_has_the_blocks_this_test_runs():
    kinds = [lang for lang, _ in _blocks()]
    assert kinds.count("python") >= 3 and kinds.count("bash") >= 3 and "" in kinds, kinds


def test_every_python_block_runs_in_order_at_tiny_sizes(tmp_path, monkeypatch):
    full_size = fastglow.Glow

    def tiny_glow(*args, **kwargs):
        given = inspect.signature(full_size).bind(*args, **kwargs).arguments
        return full_size(**{**given, "n_flow": min(given["n_flow"], 2), "hidden_channels": 8})

    monkeypatch.setattr(fastglow, "Glow", tiny_glow)
    real_compile = torch.compile  # the compile block through AOT autograd, without inductor's C++ build (minutes)
    monkeypatch.setattr(torch, "compile", lambda fn=None, mode=None, **kw: real_compile(fn, backend="aot_eager"))
    monkeypatch.chdir(tmp_path)
    torch.save(fastglow.Glow(3, 32, 4).state_dict(), "rosinality_checkpoint.pt")  # the Use block's model
    namespace = {}
    for lang, code in _blocks():
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["x_gen"].shape == (4, 1, 8, 8) and namespace["imgs"].shape == (16, 3, 64, 64)


def _image_folder(root: Path, n: int = 20, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _concrete(words: list[str], images: Path) -> list[str]:
    """The README's placeholders made real (see the module docstring)."""
    words = [str(images) if w in ("IMAGES", "~/data/celeba_hq") else w for w in words]
    for i, w in enumerate(words):
        if w.endswith("step_00002000.pt"):
            newest = sorted(Path(w).parent.glob("step_*.pt"))[-1]
            words[i] = str(newest)
    return words


def _run(words: list[str], images: Path) -> None:
    words = _concrete(words, images)
    if words[0] == "make":
        run = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    elif words[0] == "torchrun":
        words = ["--nproc_per_node", "2", *words[3:]] if words[1] == "--nproc_per_node" else words[1:]
        torchrun = Path(sys.executable).with_name("torchrun")
        run = subprocess.run([str(torchrun), *words, *TINY_TRAIN, "--device", "cpu"], capture_output=True, text=True,
                             env=cli_env(), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        assert words[0] == "fastglow", words
        tiny = TINY_TRAIN if words[1] == "train" else []
        assert main(words[1:] + tiny) == 0, words


def test_every_command_line_runs_in_order_at_tiny_sizes(tmp_path, monkeypatch):
    images = _image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.open(images / "00.png").resize((64, 64)).save(name)
    for lang, text in _blocks():
        if lang == "bash":
            for line in _command_lines(text):
                _run(shlex.split(line), images)
    assert Path("morph.png").is_file() and Path("strip.png").is_file() and Path("images.npy").is_file()


def test_the_layout_block_names_what_exists():
    (layout,) = [text for lang, text in _blocks() if lang == "" and "fastglow/__init__.py" in text]
    parent, checked = ROOT, 0
    for line in layout.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent not in (0, 2):  # deeper: a description's continuation
            continue
        name = line.split()[0]
        path = (parent if indent else ROOT) / name
        matches = list((parent if indent else ROOT).glob(name)) if "*" in name else [path] * path.exists()
        assert matches, f"README layout: {path.relative_to(ROOT)} does not exist"
        if not indent and name.endswith("/"):
            parent = path
        checked += 1
    assert checked > 30
