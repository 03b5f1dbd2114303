"""The ``fastglow`` command: train, sample, eval, interpolate.

Bad input (a missing/empty/unreadable data set, images smaller than --img-size, a corrupt checkpoint or one of
another shape) ends with one line on stderr naming the file and the problem, and exit status 2; a run stopped
by non-finite losses exits with 1; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .. import __version__, z_shapes
from .errors import InputError, TrainingError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _channels(text: str):
    if text == "auto":
        return None
    if text not in ("1", "3"):
        raise argparse.ArgumentTypeError(f"must be 1, 3 or auto, got {text}")
    return int(text)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits' (scikit-learn's 8x8 digits, 17 levels; the default for train), "
                                  "a folder of images, or an .npz of uint8 images")
    g.add_argument("--img-size", type=_positive_int, help="resize the shorter side to this and centre-crop "
                                                          "(folders: 64; .npz: native size)")
    g.add_argument("--channels", type=_channels, help="1 (grey), 3 (RGB) or auto (grey if every image is)")
    g.add_argument("--n-bits", type=int, help="quantise 8-bit images to this many bits (default 5, as rosinality)")
    g.add_argument("--npz-key", help="the .npz array to read (default 'images', or the archive's only array)")
    return g


def _add_image_output_flags(p) -> None:
    """Flags of the commands that write images: zoom, and what a bare state_dict cannot tell."""
    p.add_argument("--zoom", type=_positive_int, default=1, help="upscale each image by this factor")
    p.add_argument("--img-size", type=_positive_int, help="bare state_dicts: image size (default 64)")
    p.add_argument("--n-bits", type=int, help="bare state_dicts: bits per channel (default 5)")


def _add_shape_flags(p, defaults=None) -> None:
    """Model shape flags; ``defaults`` (train) fills the help, else they are read off the checkpoint."""
    g = p.add_argument_group("model" if defaults else "model shape (read off the checkpoint; if given, must match)")
    d = (lambda name: f" (default {getattr(defaults, name)})") if defaults else (lambda name: "")
    if not defaults:
        g.add_argument("--in-channel", type=_positive_int, help="image channels")
    g.add_argument("--n-flow", type=_positive_int, help="flow steps per level (K)" + d("n_flow"))
    g.add_argument("--n-block", type=_positive_int, help="levels (L)" + d("n_block"))
    g.add_argument("--hidden", type=_positive_int, help="coupling network width" + d("hidden"))
    coupling = g.add_mutually_exclusive_group()
    coupling.add_argument("--affine", dest="affine", action="store_const", const=True,
                          help="affine coupling" + (" (the default)" if defaults else ""))
    coupling.add_argument("--additive", dest="affine", action="store_const", const=False,
                          help="additive coupling (rosinality's train.py default)")
    g.add_argument("--no-lu", dest="conv_lu", action="store_const", const=False,
                   help="plain 1x1 conv weights instead of the LU parameterisation")


def _add_execution_flags(p):
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=("auto", "eager", "triton"), help="auto: triton on CUDA, eager elsewhere")
    return g


def _add_train_command(sub) -> None:
    from .config import TrainConfig as C

    t = sub.add_parser("train", help="train a Glow (resumable; run under torchrun for several processes)",
                       description="Train a Glow by maximum likelihood. The defaults suit the embedded 8x8 "
                                   f"digits (K={C.n_flow}, L={C.n_block}, width {C.hidden}); for rosinality's "
                                   "CelebA setup pass --n-flow 32 --n-block 4 --hidden 512 --lr 1e-4 --batch 16 "
                                   "--img-size 64 --n-bits 5 --additive --cooldown 0. Under torchrun, --batch "
                                   "is the global batch.")
    g = _add_data_flags(t)
    g.add_argument("--test-fraction", type=_fraction, help="held-out share (digits 0.2, else 0.1)")
    g.add_argument("--split-seed", type=int, help="seed of the train/held-out split (default 0)")
    _add_shape_flags(t, defaults=C)
    g = _add_execution_flags(t)
    g.add_argument("--reversible", dest="reversible", action="store_const", const=True,
                   help="constant-memory backprop (the default)")
    g.add_argument("--no-reversible", dest="reversible", action="store_const", const=False,
                   help="plain autograd (faster on CPU at small sizes)")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--cuda-graph", dest="cuda_graph", action="store_const", const=True,
                   help="replay each step's forward and backward from a CUDA graph captured at the first step "
                        "(one process; the optimizer step, NaN skip and lr schedule stay outside)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--batch", type=_positive_int, help=f"global batch size (default {C.batch})")
    o.add_argument("--lr", type=float, help=f"Adam learning rate (default {C.lr})")
    o.add_argument("--warmup", type=_non_negative_int, help=f"linear warm-up steps (default {C.warmup})")
    o.add_argument("--cooldown", type=_non_negative_int,
                   help=f"decay the lr linearly to 0 over the last this many steps (default {C.cooldown}; "
                        "0: constant, as rosinality)")
    o.add_argument("--steps", type=_positive_int, help=f"total training steps (default {C.steps})")
    o.add_argument("--seed", type=int, help="seed of the weights, data order and noise (default 0)")
    o.add_argument("--max-bad-steps", type=_positive_int,
                   help=f"stop after this many consecutive non-finite losses (default {C.max_bad_steps})")
    r = t.add_argument_group("run")
    r.add_argument("--out", help=f"run folder: checkpoints/, samples/, metrics.jsonl (default {C.out})")
    r.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    r.add_argument("--eval-every", type=_non_negative_int, help=f"steps between held-out evaluations and sample "
                                                                 f"grids (default {C.eval_every}; 0: at the end)")
    r.add_argument("--ckpt-every", type=_non_negative_int, help=f"steps between checkpoints (default "
                                                                 f"{C.ckpt_every}; 0: at the end)")
    r.add_argument("--keep", type=_positive_int, help=f"checkpoints kept (default {C.keep})")
    r.add_argument("--log-every", type=_positive_int, help=f"steps per metrics.jsonl line (default {C.log_every})")
    r.add_argument("--eval-batch", type=_positive_int, help=f"evaluation batch (default {C.eval_batch})")
    r.add_argument("--temperature", type=float, help=f"sampling temperature of the grids (default {C.temperature})")
    r.add_argument("--n-sample", type=_positive_int, help=f"images per sample grid (default {C.n_sample})")
    r.add_argument("--zoom", type=_positive_int, help="upscale grid images by this factor (default 1)")
    r.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    t.set_defaults(run=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastglow", description="Fast, memory-frugal Glow for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastglow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_command(sub)

    s = sub.add_parser("sample", help="draw a grid of samples from a checkpoint")
    s.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--temperature", type=float, default=0.7, help="latent temperature (default 0.7)")
    s.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=_positive_int, help="images per row (default: a square grid)")
    _add_image_output_flags(s)
    _add_shape_flags(s)
    _add_execution_flags(s)
    s.set_defaults(run=_sample)

    e = sub.add_parser("eval", help="bits/dim of a checkpoint on a data set")
    e.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    _add_data_flags(e)
    e.add_argument("--split", choices=("test", "train", "all"),
                   help="test: the run's held-out split (default for the run's own data); all: every image")
    e.add_argument("--batch", type=_positive_int, default=256)
    e.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    _add_shape_flags(e)
    _add_execution_flags(e)
    e.set_defaults(run=_eval)

    i = sub.add_parser("interpolate", help="decode a linear path between two images' latents to a strip PNG")
    i.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    i.add_argument("images", nargs=2, metavar="IMAGE", help="the two end points")
    i.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included (default 8)")
    i.add_argument("--out", default="interpolation.png", help="PNG to write (default interpolation.png)")
    _add_image_output_flags(i)
    _add_shape_flags(i)
    _add_execution_flags(i)
    i.set_defaults(run=_interpolate)
    return parser


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .loop import train

    fields = {f for f in TrainConfig.__dataclass_fields__ if f != "n_bins"}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["resume"] = args.resume
    summary = train(options)
    if summary["rank"] == 0:
        print(f"step {summary['step']}: test bits/dim {summary['test_bpd']:.4f} "
              f"({summary['elapsed_s']:.1f} s of training, {summary['skipped']} steps skipped)")
        print(f"samples: {summary['sample']}")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _model_flags(args) -> dict:
    keys = ("in_channel", "n_flow", "n_block", "hidden", "affine", "conv_lu", "img_size", "n_bits")
    return {k: getattr(args, k, None) for k in keys}


def _load(args, default_img_size: int = 64):
    from .checkpoint import load_model
    from .distributed import pick_device
    return load_model(args.ckpt, _model_flags(args), pick_device(args.device), args.backend or "auto",
                      default_img_size)


def _sample(args: argparse.Namespace) -> int:
    from .data import save_image_grid

    model, info = _load(args)
    gen = torch.Generator().manual_seed(args.seed)
    device = next(model.parameters()).device
    z = [args.temperature * torch.randn(args.n, *s, generator=gen).to(device)
         for s in _z_shapes(info)]
    with torch.no_grad():
        images = model.reverse(z)
    save_image_grid(images, args.out, info["n_bins"], nrow=args.nrow, zoom=args.zoom)
    print(f"{args.n} samples at temperature {args.temperature} -> {args.out}")
    return 0


def _z_shapes(info):
    return z_shapes(info["in_channel"], info["img_size"], info["n_block"])


def _eval(args: argparse.Namespace) -> int:
    from .data import load_dataset, split_dataset
    from .distributed import Dist
    from .loop import evaluate

    model, info = _load(args, default_img_size=8 if args.data == "digits" else 64)
    config = info["config"] or {}
    data = args.data or config.get("data")
    if data is None:
        raise InputError(f"{args.ckpt}: a bare state_dict has no training data recorded; pass --data")
    if data == "digits" and (info["in_channel"], info["img_size"]) != (1, 8):
        raise InputError(f"{args.ckpt}: the model takes {info['in_channel']}x{info['img_size']}x{info['img_size']} "
                         "images, the digits are 1x8x8")
    n_bits = args.n_bits if args.n_bits is not None else config.get("n_bits")
    if config and args.n_bits not in (None, config.get("n_bits")):
        raise InputError(f"{args.ckpt}: the model was trained with --n-bits {config.get('n_bits')}")
    levels, n_bins = load_dataset(data, None if data == "digits" else info["img_size"],
                                  None if data == "digits" else info["in_channel"], n_bits, args.npz_key)
    if n_bins != info["n_bins"] and config:
        raise InputError(f"{data}: has {n_bins} levels per channel, the model was trained on {info['n_bins']}")
    own_data = bool(config) and _same_data(data, config.get("data"))
    split = args.split or ("test" if own_data else "all")
    if split != "all":
        fraction = config.get("test_fraction") or (0.2 if data == "digits" else 0.1)
        seed = config.get("split_seed", 0)
        train_set, test_set = split_dataset(levels, fraction, torch.Generator().manual_seed(seed))
        levels = test_set if split == "test" else train_set
    device = next(model.parameters()).device
    bpd = evaluate(model, levels, n_bins, args.batch, args.seed, Dist(0, 1, device))
    print(f"{split} bits/dim {bpd:.4f} on {levels.shape[0]} images of {data}")
    return 0


def _same_data(a: str, b: str | None) -> bool:
    from pathlib import Path
    if b is None:
        return False
    return a == b if "digits" in (a, b) else Path(a).resolve() == Path(b).resolve()


def _interpolate(args: argparse.Namespace) -> int:
    from .data import bin_centres, image_grid, read_image, save_png, to_levels, to_pixels

    if args.steps < 2:
        raise InputError(f"--steps must be at least 2 (the two end points), got {args.steps}")
    model, info = _load(args)
    device = next(model.parameters()).device
    ends = [to_levels(read_image(p, info["img_size"], info["in_channel"]), info["n_bins"]) for p in args.images]
    x = bin_centres(torch.stack(ends), info["n_bins"]).to(device)
    with torch.no_grad():
        _, _, z_outs = model(x)
        t = torch.linspace(0, 1, args.steps, device=device).view(-1, 1, 1, 1)
        path = [(1 - t) * z[0:1] + t * z[1:2] for z in z_outs]  # z_t = (1 - t) z_A + t z_B, every level
        images = model.reverse(path, reconstruct=True)
    save_png(image_grid(to_pixels(images, info["n_bins"]), nrow=args.steps, zoom=args.zoom), args.out)
    print(f"{args.steps} images from {args.images[0]} to {args.images[1]} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except InputError as err:
        print(f"fastglow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable: the message names the path
        print(f"fastglow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"fastglow {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastglow {args.command}: interrupted" + (" (continue with --resume)" if args.command == "train"
                                                          else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
