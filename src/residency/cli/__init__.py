"""The ``residency`` command line (also ``python -m residency``). Each group of sub-commands lives in its own
module of this package; errors of residency end the command with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import ResidencyError

# Modules that each define ``register(subparsers)``; a sub-command stores its handler as ``func``.
COMMAND_MODULES = ("residency.cli.model", "residency.cli.plan", "residency.cli.profile", "residency.cli.serve",
                   "residency.cli.quantize")


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
        # an error may carry a wording for command-line users (naming flags instead of Python arguments)
        message = getattr(exc, "cli_message", None) or str(exc)
        print(f"residency {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # output piped into a reader that stopped early (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
