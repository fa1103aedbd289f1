"""The `igpt` command: a thin layer of argument parsing over the library.

Each subcommand is a `_cmd_*` function taking the parsed arguments; user errors are
`IgptError`s, printed by `main` as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys

from igpt.errors import IgptError


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument(
        "--data",
        default=default,
        required=default is None,
        help="digits | mnist | fashion-mnist | cifar10 | cifar100 | an image folder, "
        ".tar/.tar.gz/.zip of one, or a .npz (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="folder holding existing copies of a named data set")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) corrupt images instead of stopping")
    p.add_argument("--crop", action="store_true", help="centre-crop images to square before resizing")


def _cmd_palette_fit(args: argparse.Namespace) -> None:
    from igpt import data
    from igpt.palette import Palette

    train = data.load(
        args.data, "train", args.resolution, data_dir=args.data_dir, crop=args.crop, skip_bad=args.skip_bad
    )
    palette = Palette.fit(
        train.images, clusters=args.clusters, max_pixels=args.max_pixels, seed=args.seed, device=args.device, log=print
    )
    palette.save(args.out)
    print(f"wrote {args.out}: {palette.size} colours fitted on {train.describe()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    parser.add_argument("--version", action="version", version=f"igpt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    palette = sub.add_parser("palette", help="fit or inspect a colour palette")
    palette_sub = palette.add_subparsers(dest="palette_command", metavar="ACTION")
    fit = palette_sub.add_parser("fit", help="k-means colour palette over a data set's training pixels")
    _add_data_args(fit)
    fit.add_argument("--clusters", type=_positive_int, default=512, help="palette size K (default: %(default)s)")
    fit.add_argument("--resolution", type=_positive_int, default=32, help="input resolution (default: %(default)s)")
    fit.add_argument("--out", required=True, help="output .npy (or preprocessor_config.json for Hugging Face)")
    fit.add_argument("--max-pixels", type=_positive_int, default=2_000_000, help="pixels sampled (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    fit.set_defaults(func=_cmd_palette_fit)
    return parser


def _version() -> str:
    from igpt import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help() if args.command is None else parser.parse_args([args.command, "--help"])
        return 2
    try:
        args.func(args)
    except IgptError as err:
        print(f"igpt: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
