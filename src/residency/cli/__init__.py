"""The ``residency`` command line. Each group of sub-commands lives in its own ``cli_*`` module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import ResidencyError

# Modules that each define ``register(subparsers)``; a sub-command stores its handler as ``func``.
COMMAND_MODULES = ("residency.cli.model", "residency.cli.plan", "residency.cli.profile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="residency",
        description="Expert residency and offload for Nemotron 3 Super: profile, plan, simulate, generate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except ResidencyError as exc:
        print(f"residency {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # output piped into a reader that stopped early (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
