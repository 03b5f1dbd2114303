"""The ``fastglow`` command."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    """Build a Glow on the embedded digits, run forward and reverse, print bits/dim and reconstruction."""
    from .data import DIGITS_LEVELS, dequantize, load_digits
    from .model import Glow
    from .reference import bits_per_dim

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    _, test = load_digits(gen)
    x = dequantize(test[: args.batch], DIGITS_LEVELS, gen)
    model = Glow(1, args.n_flow, args.n_block, hidden_channels=args.hidden, backend="eager")
    with torch.no_grad():
        model(x)  # first batch: ActNorm's data-dependent init
        log_p, logdet, z_outs = model(x)
        x_rec = model.reverse(z_outs, reconstruct=True)
        samples = model.sample(4, temperature=0.7)
    bpd = bits_per_dim(log_p, logdet, x.shape, DIGITS_LEVELS).item()
    err = ((x_rec - x).norm() / x.norm()).item()
    print(f"fastglow {__version__}: Glow(K={args.n_flow}, L={args.n_block}, width={args.hidden}) "
          f"on {x.shape[0]} digits 1x8x8")
    print(f"bits/dim (untrained, uniform is 4.09): {bpd:.3f}")
    print(f"relative reconstruction error: {err:.2e}")
    print(f"sampled {samples.shape[0]} images, finite: {bool(torch.isfinite(samples).all())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastglow", description="Fast, memory-frugal Glow for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastglow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="forward/reverse a Glow on the embedded digits data set")
    demo.add_argument("--n-flow", type=int, default=8)
    demo.add_argument("--n-block", type=int, default=3)
    demo.add_argument("--hidden", type=int, default=64)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
