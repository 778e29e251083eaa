"""The `prune` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _keep(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep must be a number, got {text!r}") from None
    if "." not in text and "e" not in text.lower():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("keep as a token count must be >= 1")
        return value
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("keep as a fraction must be in (0, 1]")
    return value


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, method_names

    for name in method_names():
        cls = get_method(name)
        print(f"{name:<9} {cls.description}")
        for option, default in cls.defaults.items():
            print(f"{'':<11}{option} = {default!r}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation.demo import run_demo, run_video_demo

    if args.video is not None:
        if not Path(args.video).is_file():
            print(f"prune demo: error: no video file at {args.video}", file=sys.stderr)
            return 2
        run_video_demo(args.video, out_dir=args.out, keep=args.keep, seed=args.seed)
    else:
        run_demo(out_dir=args.out, keep=args.keep, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune", description="Prune the vision tokens of Hugging Face VLMs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("methods", help="list methods, their options and defaults")
    p.set_defaults(func=_cmd_methods)
    p = sub.add_parser(
        "demo", help="prune a generated image with every method on a small LLaVA built in code"
    )
    p.add_argument("--out", default="prune-demo", help="folder for kept.png (default: %(default)s)")
    p.add_argument(
        "--keep", type=_keep, default=0.25, help="fraction or count of vision tokens (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the model and the image (default: %(default)s)"
    )
    p.add_argument(
        "--video",
        default=None,
        metavar="FILE",
        help="prune this video's frames on a small Qwen2.5-VL instead (needs the video extra)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
