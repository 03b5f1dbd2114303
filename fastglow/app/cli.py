"""The ``fastglow`` command: train, sample, eval, interpolate, morph, prepare.

Bad input (a missing/empty/unreadable data set, images smaller than --img-size, a corrupt checkpoint or one of
another shape, or whose weights do not decode; a bad flag) ends with one line on stderr naming the file and the
problem, and exit status 2; a run that diverged (non-finite losses, a model that no longer inverts) exits with 1
after keeping its last sound weights; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .. import __version__, z_shapes
from ..permutation import PERMUTATIONS
from . import flags, missing_app_packages
from .errors import InputError, TrainingError, one_line
from .limits import DECODE_BATCH, check_grid
from .prepare import add_prepare_command


def _add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits' (scikit-learn's 8x8 digits, 17 levels; the default for train), "
                                  "a folder of images, an LMDB folder (rosinality's layout), or an .npy "
                                  "(read image by image; see fastglow prepare) or .npz of uint8 images")
    g.add_argument("--img-size", type=flags.positive_int, help="resize the shorter side to this and centre-crop "
                                                          "(folders: 64; .npz: native size)")
    g.add_argument("--channels", type=flags.channels, help="1 (grey), 3 (RGB) or auto (grey if every image is)")
    g.add_argument("--n-bits", type=flags.n_bits, help="quantise 8-bit images to this many bits (default 5, as rosinality)")
    g.add_argument("--npz-key", help="the .npz array to read (default 'images', or the archive's only array)")
    return g


def _add_image_output_flags(p, data: bool = True) -> None:
    """Flags of the commands that write images: zoom, and what a bare state_dict cannot tell."""
    p.add_argument("--zoom", type=flags.positive_int, default=1, help="upscale each image by this factor")
    p.add_argument("--img-size", type=flags.positive_int, help="bare state_dicts: image size (default 64)")
    p.add_argument("--n-bits", type=flags.n_bits, help="bare state_dicts: bits per channel (default 5)")
    if data:
        p.add_argument("--data", help="bare state_dicts: the data set the model was trained on ('digits': 8x8, "
                                      "17 levels); with a checkpoint, it must agree")


def _add_shape_flags(p, defaults=None) -> None:
    """Model shape flags; ``defaults`` (train) fills the help, else they are read off the checkpoint."""
    g = p.add_argument_group("model" if defaults else "model shape (read off the checkpoint; if given, must match)")
    d = (lambda name: f" (default {getattr(defaults, name)})") if defaults else (lambda name: "")
    if not defaults:
        g.add_argument("--in-channel", type=flags.positive_int, help="image channels")
    g.add_argument("--n-flow", type=flags.positive_int, help="flow steps per level (K)" + d("n_flow"))
    g.add_argument("--n-block", type=flags.positive_int, help="levels (L)" + d("n_block"))
    g.add_argument("--hidden", type=flags.positive_int, help="coupling network width" + d("hidden"))
    coupling = g.add_mutually_exclusive_group()
    coupling.add_argument("--affine", dest="affine", action="store_const", const=True,
                          help="affine coupling" + (" (the default)" if defaults else ""))
    coupling.add_argument("--additive", dest="affine", action="store_const", const=False,
                          help="additive coupling (rosinality's train.py default)")
    g.add_argument("--no-lu", dest="conv_lu", action="store_const", const=False,
                   help="plain 1x1 conv weights instead of the LU parameterisation")
    g.add_argument("--permutation", choices=PERMUTATIONS,
                   help="what mixes the channels between couplings: conv (Glow's learned 1x1 conv), shuffle (a "
                        "fixed random permutation, RealNVP) or reverse (NICE)" + d("permutation"))


def _add_execution_flags(p):
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=("auto", "eager", "triton"), help="auto: triton on CUDA, eager elsewhere")
    g.add_argument("--threads", type=flags.threads,
                   help="CPU threads for torch (default: train, torch's choice within the CPUs available, so "
                        "that a resume computes alike; other commands, those CPUs less the machine's load)")
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
    g.add_argument("--test-fraction", type=flags.open_fraction, help="held-out share (digits 0.2, else 0.1)")
    g.add_argument("--split-seed", type=flags.seed, help="seed of the train/held-out split (default 0)")
    g.add_argument("--workers", type=flags.non_negative_int,
                   help="DataLoader processes per training process that decode images (default: the cores "
                        "less one, shared by the processes, at most 8; 0 for data in memory)")
    g.add_argument("--max-bad-images", type=flags.fraction,
                   help=f"stop when more than this share of the training images proves unreadable "
                        f"(default {C.max_bad_images:g}; fewer are skipped, counted and logged)")
    _add_shape_flags(t, defaults=C)
    c = t.add_argument_group("classes")
    c.add_argument("--conditional", action="store_const", const=True,
                   help="class-conditional Glow: the top prior depends on the label (digits: 0-9; a folder: one "
                        "subfolder per class; an .npz: its 'labels' array), plus an auxiliary classifier")
    c.add_argument("--class-weight", type=flags.non_negative_float,
                   help=f"weight of the classifier's cross-entropy (bits) in the loss (default {C.class_weight})")
    g = _add_execution_flags(t)
    g.add_argument("--reversible", dest="reversible", action="store_const", const=True,
                   help="constant-memory backprop (the default)")
    g.add_argument("--no-reversible", dest="reversible", action="store_const", const=False,
                   help="plain autograd (faster on CPU at small sizes)")
    g.add_argument("--cuda-graph", dest="cuda_graph", action="store_const", const=True,
                   help="replay each step's forward and backward from a CUDA graph captured at the first step "
                        "(one process; the optimizer step, NaN skip and lr schedule stay outside)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--batch", type=flags.positive_int, help=f"global batch size (default {C.batch})")
    o.add_argument("--lr", type=flags.learning_rate, help=f"Adam learning rate (default {C.lr})")
    o.add_argument("--warmup", type=flags.non_negative_int, help=f"linear warm-up steps (default {C.warmup})")
    o.add_argument("--cooldown", type=flags.non_negative_int,
                   help="decay the lr linearly to 0 over the last this many steps (default: half of --steps; "
                        "0: constant, as rosinality)")
    o.add_argument("--steps", type=flags.positive_int, help=f"total training steps (default {C.steps})")
    o.add_argument("--seed", type=flags.seed, help="seed of the weights, data order and noise (default 0)")
    o.add_argument("--max-bad-steps", type=flags.positive_int,
                   help=f"stop after this many consecutive non-finite losses (default {C.max_bad_steps})")
    r = t.add_argument_group("run")
    r.add_argument("--out", type=flags.run_folder,
                   help=f"run folder: checkpoints/, samples/, metrics.jsonl (default {C.out})")
    start = r.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    start.add_argument("--new-run", action="store_true",
                       help="start a new run in an --out that holds an earlier run with no readable checkpoint; "
                            "its files move (never deleted) to --out/earlier-run-<UTC time>/")
    r.add_argument("--eval-every", type=flags.non_negative_int, help=f"steps between held-out evaluations and sample "
                                                                 f"grids (default {C.eval_every}; 0: at the end)")
    r.add_argument("--ckpt-every", type=flags.non_negative_int, help=f"steps between checkpoints (default "
                                                                 f"{C.ckpt_every}; 0: at the end)")
    r.add_argument("--keep", type=flags.positive_int, help=f"checkpoints kept (default {C.keep})")
    r.add_argument("--log-every", type=flags.positive_int, help=f"steps per metrics.jsonl line (default {C.log_every})")
    r.add_argument("--eval-batch", type=flags.positive_int, help=f"evaluation batch (default {C.eval_batch})")
    r.add_argument("--temperature", type=flags.temperature,
                   help=f"sampling temperature of the grids (default {C.temperature})")
    r.add_argument("--n-sample", type=flags.positive_int, help=f"images per sample grid (default {C.n_sample})")
    r.add_argument("--zoom", type=flags.positive_int, help="upscale grid images by this factor (default 1)")
    r.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    t.set_defaults(run=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = flags.OneLineParser(prog="fastglow", description="Fast, memory-frugal Glow for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastglow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # command -> its parser
    _add_train_command(sub)

    s = sub.add_parser("sample", help="draw a grid of samples from a checkpoint")
    s.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    s.add_argument("--n", type=flags.positive_int, help="number of samples (default 64; with --class all, per class, "
                                                    "default 10)")
    s.add_argument("--class", dest="classes", metavar="CLASS",
                   help="class-conditional checkpoints: the class (id or name) of every sample, or 'all' for one "
                        "row per class (default: each sample's class drawn uniformly)")
    s.add_argument("--temperature", type=flags.temperature, default=0.7, help="latent temperature (default 0.7)")
    s.add_argument("--out", type=flags.png_file, default="samples.png", help="PNG to write (default samples.png)")
    s.add_argument("--seed", type=flags.seed, default=0, help="seed of the latents (default 0)")
    s.add_argument("--nrow", type=flags.positive_int, help="images per row (default: a square grid)")
    _add_image_output_flags(s)
    _add_shape_flags(s)
    _add_execution_flags(s)
    s.set_defaults(run=_sample)

    e = sub.add_parser("eval", help="bits/dim of a checkpoint on a data set")
    e.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    _add_data_flags(e)
    e.add_argument("--split", choices=("test", "train", "all"),
                   help="test: the run's held-out split (default for the run's own data); all: every image")
    e.add_argument("--batch", type=flags.positive_int, default=256)
    e.add_argument("--seed", type=flags.seed, default=0, help="seed of the dequantisation noise")
    _add_shape_flags(e)
    _add_execution_flags(e)
    e.set_defaults(run=_eval)

    i = sub.add_parser("interpolate", help="decode a linear path between two images' latents to a strip PNG")
    i.add_argument("--ckpt", required=True, help="a fastglow checkpoint or a bare (rosinality) state_dict")
    i.add_argument("images", nargs=2, metavar="IMAGE", help="the two end points")
    i.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included (default 8)")
    i.add_argument("--out", type=flags.png_file, default="interpolation.png",
                   help="PNG to write (default interpolation.png)")
    _add_image_output_flags(i)
    _add_shape_flags(i)
    _add_execution_flags(i)
    i.set_defaults(run=_interpolate)
    _add_morph_command(sub)
    add_prepare_command(sub)
    return parser


def _add_morph_command(sub) -> None:
    m = sub.add_parser("morph", help="class-conditional checkpoints: a strip moving a held-out image of one class "
                                     "toward another (along the difference of the class-mean latents)")
    m.add_argument("--ckpt", required=True, help="a checkpoint trained with --conditional")
    m.add_argument("--from", dest="class_from", required=True, metavar="CLASS", help="class (id or name) of the image")
    m.add_argument("--to", dest="class_to", required=True, metavar="CLASS", help="class (id or name) to move toward")
    m.add_argument("--index", type=flags.non_negative_int, default=0,
                   help="which held-out image of class --from (default 0, the first)")
    m.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included (default 8)")
    m.add_argument("--out", type=flags.png_file, default="morph.png", help="PNG to write (default morph.png)")
    m.add_argument("--data", help="the data set (default: the run's own); class means come from its training split")
    m.add_argument("--npz-key", help="the .npz array to read (as for train)")
    m.add_argument("--batch", type=flags.positive_int, default=256)
    _add_image_output_flags(m, data=False)
    _add_shape_flags(m)
    _add_execution_flags(m)
    m.set_defaults(run=_morph)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .loop import train

    fields = {f for f in TrainConfig.__dataclass_fields__ if f != "n_bins"}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["resume"], options["new_run"] = args.resume, args.new_run
    summary = train(options)
    if summary["rank"] == 0:
        print(f"step {summary['step']}: test bits/dim {summary['test_bpd']:.4f} "
              f"({summary['elapsed_s']:.1f} s of wall time, evaluations and sample grids included; "
              f"{summary['skipped']} steps skipped)")
        if summary["test_accuracy"] is not None:
            print(f"held-out classification accuracy {summary['test_accuracy']:.4f}")
        print(f"samples: {summary['sample']}")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _decode(model, z_list, args, y=None, reconstruct: bool = False):
    """Latents (and classes y) -> images, or an InputError naming the checkpoint when its weights do not decode."""
    from .guard import decode

    images, why = decode(model, z_list, y, reconstruct=reconstruct, batch=DECODE_BATCH)
    if why:
        raise InputError(f"{args.ckpt}: {why}: the checkpoint's weights are unusable (diverged?); "
                         "use an earlier checkpoint")
    return images


def _sample(args: argparse.Namespace) -> int:
    from .classes import sample_labels
    from .data import save_image_grid
    from .model_io import load_for_command

    model, info = load_for_command(args)
    gen = torch.Generator().manual_seed(args.seed)
    device = next(model.parameters()).device
    y, nrow = sample_labels(args.classes, args.n, args.nrow, info, gen, args.ckpt)
    n = (args.n or 64) if y is None else y.shape[0]
    check_grid(n, info["in_channel"], info["img_size"], args.zoom, nrow, "--n")
    z = [args.temperature * torch.randn(n, *s, generator=gen).to(device)
         for s in _z_shapes(info)]
    images = _decode(model, z, args, None if y is None else y.to(device))
    save_image_grid(images, args.out, info["n_bins"], nrow=nrow, zoom=args.zoom)
    print(f"{n} samples at temperature {args.temperature} -> {args.out}")
    return 0


def _z_shapes(info):
    return z_shapes(info["in_channel"], info["img_size"], info["n_block"])


def _eval(args: argparse.Namespace) -> int:
    from .classes import classification_accuracy
    from .distributed import Dist
    from .fingerprint import same_source
    from .model_io import checkpoint_data, load_for_command, run_split
    from .objective import evaluate

    model, info = load_for_command(args)
    config = info["config"] or {}
    data, levels, labels = checkpoint_data(args.ckpt, info, args.data, args.n_bits, args.npz_key)
    split = args.split or ("test" if same_source(data, config.get("data")) else "all")
    if split != "all":
        levels, labels = run_split(levels, labels, data, info)[split == "test"]
    device = next(model.parameters()).device
    bpd = evaluate(model, levels, info["n_bins"], args.batch, args.seed, Dist(0, 1, device), labels)
    if not math.isfinite(bpd):
        raise InputError(f"{args.ckpt}: the bits/dim is {bpd}: the checkpoint's weights are unusable (diverged?); "
                         "use an earlier checkpoint")
    accuracy = ""
    if labels is not None:
        correct = classification_accuracy(model, levels, labels, info["n_bins"], args.batch, device)
        accuracy = f" given their classes, classification accuracy {correct:.4f}"
    print(f"{split} bits/dim {bpd:.4f} on {levels.shape[0]} images of {data}{accuracy}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from .data import bin_centres, image_grid, save_png, to_levels, to_pixels
    from .images import read_image
    from .model_io import load_for_command

    if args.steps < 2:
        raise InputError(f"--steps must be at least 2 (the two end points), got {args.steps}")
    model, info = load_for_command(args)
    check_grid(args.steps, info["in_channel"], info["img_size"], args.zoom, args.steps, "--steps")
    device = next(model.parameters()).device
    ends = [to_levels(read_image(p, info["img_size"], info["in_channel"]), info["n_bins"]) for p in args.images]
    x = bin_centres(torch.stack(ends), info["n_bins"]).to(device)
    with torch.no_grad():
        z_outs = model.encode(x)
        t = torch.linspace(0, 1, args.steps, device=device).view(-1, 1, 1, 1)
        path = [(1 - t) * z[0:1] + t * z[1:2] for z in z_outs]  # z_t = (1 - t) z_A + t z_B, every level
    images = _decode(model, path, args, reconstruct=True)
    save_png(image_grid(to_pixels(images, info["n_bins"]), nrow=args.steps, zoom=args.zoom), args.out)
    print(f"{args.steps} images from {args.images[0]} to {args.images[1]} -> {args.out}")
    return 0


def _morph(args: argparse.Namespace) -> int:
    from .classes import class_mean_latents, morph_path, resolve_class
    from .data import bin_centres, image_grid, save_png, to_pixels
    from .model_io import checkpoint_data, load_for_command, run_split

    if args.steps < 2:
        raise InputError(f"--steps must be at least 2 (the two end points), got {args.steps}")
    model, info = load_for_command(args)
    if info["n_classes"] is None:
        raise InputError(f"{args.ckpt}: the model is unconditional; morph needs a checkpoint trained with "
                         "--conditional")
    check_grid(args.steps, info["in_channel"], info["img_size"], args.zoom, args.steps, "--steps")
    a, b = (resolve_class(text, info["class_names"], info["n_classes"], flag)
            for text, flag in ((args.class_from, "--from"), (args.class_to, "--to")))
    data, levels, labels = checkpoint_data(args.ckpt, info, args.data, args.n_bits, args.npz_key)
    (train_set, train_labels), (test_set, test_labels) = run_split(levels, labels, data, info)
    held_out = test_set[test_labels == a]
    if args.index >= held_out.shape[0]:
        raise InputError(f"--index {args.index}: the held-out split has {held_out.shape[0]} images of class "
                         f"{args.class_from}")
    device, n_bins = next(model.parameters()).device, info["n_bins"]
    means = class_mean_latents(model, train_set, train_labels, (a, b), n_bins, args.batch, device)
    x = bin_centres(held_out[args.index:args.index + 1], n_bins).to(device)
    with torch.no_grad():
        z_outs = model(x, torch.tensor([a], device=device))[2]
    images = _decode(model, morph_path(z_outs, means[a], means[b], args.steps), args, reconstruct=True)
    save_png(image_grid(to_pixels(images, n_bins), nrow=args.steps, zoom=args.zoom), args.out)
    print(f"held-out image {args.index} of class {args.class_from} moved toward class {args.class_to} in "
          f"{args.steps} steps -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    missing = missing_app_packages()
    if missing:  # the library alone was installed
        print(f"fastglow: the command line needs {', '.join(missing)}: pip install 'fastglow[app]'", file=sys.stderr)
        return 2
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 0
    if unknown:  # named by the command's own parser: "fastglow eval: error: ..."
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    threads = torch.get_num_threads()  # restored at the end: main() may run inside a longer process
    torch.set_num_threads(getattr(args, "threads", None) or flags.default_threads(args.command == "train"))
    try:
        return args.run(args)
    except InputError as err:
        print(f"fastglow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable: the message names the path
        where = "" if err.filename or not getattr(args, "out", None) else f" (writing {args.out})"
        print(f"fastglow {args.command}: error: {one_line(err)}{where}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"fastglow {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = {"train": " (continue with --resume)", "prepare": " (the same command resumes)"}
        print(f"fastglow {args.command}: interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
