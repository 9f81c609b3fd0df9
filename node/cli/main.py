"""The ``mr2nst`` command: the composition root that wires config, logging and services.

Each command lives in its own module of this package with ``add_parser(sub)``; heavy
imports stay inside the command functions, so ``mr2nst --help`` starts fast.

Exit codes: 0 success, 2 usage or config error (one-line reason), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from mr2nst.bank.errors import BankError
from mr2nst.core.errors import EngineConfigError, RefinerError, WeightsError
from mr2nst.node.cli.common import EXIT_RUNTIME, EXIT_USAGE, Parser
from mr2nst.node.errors import ConfigError, NodeError, UsageError
from mr2nst.node.version import VERSION

# The command modules of this package, in the order ``mr2nst --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "serve",
    "demo",
    "transfer",
    "echo",
    "send",
    "queue",
    "ledger",
    "status",
    "bank",
    "phantom",
    "config",
    "evaluate",
    "bench",
    "train_refiner",
    "train_fast",
    "train_cyclegan",
    "cad_study",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``mr2nst`` parser with every command module's subparser."""
    parser = Parser(
        prog="mr2nst", description="DICOM node that normalizes GE mammograms to UIH style (mr2NST)."
    )
    parser.add_argument("--version", action="version", version=f"mr2nst {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        import_module(f"mr2nst.node.cli.{name}").add_parser(sub)
    return parser


def without_prog(message: str) -> str:
    """``message`` without a leading program name, which :func:`main` adds once.

    argparse names the parser that failed (``mr2nst: ...``, ``mr2nst queue: ...``); the
    message then reads ``queue: ...`` so that the printed line starts with one
    ``mr2nst:``.
    """
    for prefix in ("mr2nst: ", "mr2nst "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.

    Returns:
        The exit code: 0 success, 1 runtime failure, 2 usage or config error.
    """
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        print(f"mr2nst: {without_prog(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, EngineConfigError, WeightsError, RefinerError) as exc:
        print(f"mr2nst: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except BrokenPipeError:  # e.g. `mr2nst queue list --json | head`: the reader left
        # Python's documented recipe: point stdout at devnull so that the flush at exit
        # does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUNTIME
    except (NodeError, BankError) as exc:
        print(f"mr2nst: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
