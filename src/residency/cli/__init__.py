"""The ``residency`` command line (also ``python -m residency``). Each group of sub-commands lives in its own
module of this package; errors of residency end the command with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from ..errors import ResidencyError

# Modules that each define ``register(subparsers)``; a sub-command stores its handler as ``func``.
COMMAND_MODULES = ("residency.cli.model", "residency.cli.plan", "residency.cli.profile", "residency.cli.serve",
                   "residency.cli.quantize")


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``residency plan: error: ... (see residency plan --help)``), exit 2.

    The stock parser prints the whole usage block before the error, so the line that names the
    problem is buried under a screen of options.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    except KeyboardInterrupt:
        # Ctrl-C: one line instead of a traceback; 130 is the shell's status for SIGINT
        print(f"residency {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into a reader that stopped early (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
