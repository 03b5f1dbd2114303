"""Data loading at scale, CPU: start-up and memory flat in the data set's size, loader throughput.

    python -m benchmarks.studies.data_loading startup [--sizes 2000 20000] [--repeats 3] [--root /tmp/fastglow-data]
    python -m benchmarks.studies.data_loading throughput [--images 512] [--workers 2] [--batches 40]

startup: for each size N, a folder of N generated 64x64 PNGs, the same prepared into an .npy
(``fastglow prepare``) and written as a rosinality-style LMDB (64-xxxxx keys, JPEG); then ``fastglow train``
on each (tiny model, one loader worker) is launched and timed from the launch to its first "train" line in
metrics.jsonl (--log-every 1), when the peak RSS (VmHWM) of the trainer and of its loader worker are read from
/proc and the process is killed. Median over the repeats. Generated data stays under --root (not committed).

throughput: folders of 256x256 and of 1024x1024 JPEGs (the size of CelebA-HQ's originals; smooth random
content, quality 90) and the 256 one prepared into an .npy; images/s at 256x256 delivered by the training
DataLoader (the run's own sampler, batch 16) with 0 and --workers workers, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastglow.testing import descendants

TRAIN_FLAGS = ["--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--img-size", "64",
               "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1", "--steps", "1000", "--no-progress",
               "--threads", "1", "--workers", "1"]


def smooth_images(n: int, size: int, seed: int):
    """``n`` RGB images (size x size) of noise at 1/8 of the size, upscaled bicubically: smooth, with detail
    at every scale down to 8 pixels (photo-like JPEG sizes), cheap to generate."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
        yield small.resize((size, size), Image.Resampling.BICUBIC)


def make_folder(root: Path, n: int, size: int, ext: str) -> Path:
    folder = root / f"{ext}{size}-{n}"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(smooth_images(n, size, seed=n)):
            im.save(folder / f"{i:06d}.{ext}", quality=90) if ext == "jpg" else im.save(folder / f"{i:06d}.{ext}")
        (folder / ".complete").touch()
    return folder


def make_npy(folder: Path, size: int) -> Path:
    out = folder.with_suffix(".npy")
    if not out.exists():
        subprocess.run([sys.executable, "-m", "fastglow", "prepare", str(folder), str(out), "--img-size",
                        str(size), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return out


def make_lmdb(root: Path, n: int, size: int) -> Path:
    """rosinality's layout: key f"{size}-{i:05d}" -> JPEG bytes, "length" -> n."""
    import lmdb

    path = root / f"lmdb{size}-{n}.lmdb"
    if not (path / ".complete").exists():
        with lmdb.open(str(path), map_size=1 << 32) as env, env.begin(write=True) as txn:
            for i, im in enumerate(smooth_images(n, size, seed=n)):
                buffer = io.BytesIO()
                im.save(buffer, format="jpeg", quality=100)
                txn.put(f"{size}-{str(i).zfill(5)}".encode(), buffer.getvalue())
            txn.put(b"length", str(n).encode())
        (path / ".complete").touch()
    return path


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_to_first_step(data: Path, out: Path) -> tuple[float, float, float]:
    """(seconds from launch to the first "train" line, peak RSS MB of the trainer, of its loader worker)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fastglow", "train", "--data", str(data), "--out", str(out),
                             *TRAIN_FLAGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.exists() and '"event": "train"' in metrics.read_text()):
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        workers = descendants(proc.pid)
        return seconds, _peak_rss_mb(proc.pid), max((_peak_rss_mb(w) for w in workers), default=0.0)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def startup(args) -> None:
    """Each data kind at each size, the sizes interleaved within every repeat (so that the load of a shared
    machine falls on both alike); the median and the minimum over the repeats."""
    root = Path(args.root)
    sources = {}
    for n in args.sizes:
        folder = make_folder(root, n, 64, "png")
        sources.update({("PNG folder", n): folder, (".npy (prepared)", n): make_npy(folder, 64),
                        ("LMDB", n): make_lmdb(root, n, 64)})
    runs = {key: [] for key in sources}
    for _ in range(args.repeats):
        for key, data in sources.items():
            runs[key].append(time_to_first_step(data, root / "run"))
            print(f"{key}: {runs[key][-1]}", file=sys.stderr, flush=True)
    print("| data | images | launch to first step, median (min) s | trainer peak RSS MB | loader worker peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    stats = {}
    for (kind, n), r in runs.items():
        stats[kind, n] = [statistics.median(x[i] for x in r) for i in range(3)] + [min(x[0] for x in r)]
        seconds, rss, worker, fastest = stats[kind, n]
        print(f"| {kind} | {n} | {seconds:.2f} ({fastest:.2f}) | {rss:.0f} | {worker:.0f} |")
    small, large = args.sizes[0], args.sizes[-1]
    for kind in dict.fromkeys(k for k, _ in runs):
        a, b = stats[kind, small], stats[kind, large]
        print(f"\n{kind}, {large} / {small} images: time x{b[0] / a[0]:.2f} (min x{b[3] / a[3]:.2f}), trainer RSS "
              f"x{b[1] / a[1]:.2f}, worker RSS x{b[2] / a[2]:.2f}", end="")
    print()


def loader_rate(data: Path, workers: int, batches: int) -> float:
    """Images/s of the training DataLoader over ``data`` (256x256, 8 bits), after one warm-up batch."""
    import torch

    from fastglow.app.data import open_dataset
    from fastglow.app.datasets import Split
    from fastglow.app.sampler import StepBatches, make_loader

    torch.set_num_threads(1)
    images, _ = open_dataset(str(data), img_size=256, n_bits=8)
    split = Split(images, torch.arange(len(images)))
    loader = iter(make_loader(split, StepBatches(len(split), 16, seed=0, start=1), workers, pin=False))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * 16 / (time.perf_counter() - start)
    del loader
    return rate


def throughput(args) -> None:
    folder = make_folder(Path(args.root), args.images, 256, "jpg")
    large = make_folder(Path(args.root), args.images, 1024, "jpg")
    sources = (("256x256 JPEG folder", folder), ("1024x1024 JPEG folder, resized to 256", large),
               (".npy prepared from the 256x256 folder", make_npy(folder, 256)))
    print("| source (training at 256x256, batch 16) | loader workers | images/s |")
    print("|---|---:|---:|")
    for kind, data in sources:
        for workers in (0, args.workers):
            print(f"| {kind} | {workers} | {loader_rate(data, workers, args.batches):.0f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    s.add_argument("--repeats", type=int, default=5)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=512)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--batches", type=int, default=40)
    for p in (s, t):
        p.add_argument("--root", default="/tmp/fastglow-data")
    args = parser.parse_args(argv)
    startup(args) if args.what == "startup" else throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
