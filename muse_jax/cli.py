"""`muse-jax`: the one command-line entry point, with a subcommand per job.

Subcommands parse their arguments and call the library; they hold no logic of their own.
Commands that take `--config` also accept `--config.field=value` overrides.
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def _data_shapes(args, overrides):
    from muse_jax.data import export

    out = export.export_shapes(args.out, args.num, args.split, args.seed)
    print(f"wrote {args.num} {args.split} images and captions.jsonl to {out}")


def _quickstart(args, overrides):
    from muse_jax import quickstart

    quickstart.run(args.workdir, args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="dataset", required=True)
    p = data.add_parser("shapes", help="export the shapes dataset as PNGs + captions.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of examples")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_data_shapes)

    p = sub.add_parser("quickstart", help="run the whole pipeline on the embedded default")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="shapes", help="config name or path (default: shapes)")
    p.set_defaults(fn=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        args.fn(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"muse-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
