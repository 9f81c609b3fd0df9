"""What every command module shares: exit codes, the parser class, JSON output, time format."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any, NoReturn

from mr2nst.node.config import Config, load_config
from mr2nst.node.errors import UsageError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (exit 2, one line)."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting."""
        raise UsageError(f"{self.prog}: {message}")


def config_of(args: argparse.Namespace) -> Config:
    """The config named by ``--config`` (the built-in defaults when absent)."""
    return load_config(getattr(args, "config", None))


def print_json(value: Any) -> None:
    """One JSON document on stdout (indented; unknown types as strings)."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def iso_time(ts: float | None) -> str | None:
    """A ledger time (seconds since the epoch) as ISO 8601 UTC, or None."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def add_network_arguments(p: argparse.ArgumentParser) -> None:
    """host, port and the AE/timeout options of the SCU commands."""
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default="MR2NST_SCU", help="our (calling) AE title")
    p.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.add_argument("--json", action="store_true")
