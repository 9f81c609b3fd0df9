"""``mr2nst config``: ``check`` validates a config file; ``reload`` makes the running node
read its file again (routes and destinations, without dropping associations)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, Parser, print_json
from mr2nst.node.config import Config, load_config

#: How long ``config reload`` waits for the node to report the outcome.
RELOAD_WAIT_S = 15.0


def add_parser(sub: Any) -> None:
    """Register ``mr2nst config check`` and ``mr2nst config reload``."""
    p = sub.add_parser("config", help="configuration tools: check a file, reload the node")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_check)
    r = csub.add_parser(
        "reload",
        help="check the node's config file, then make the running node reload its routes "
        "and destinations (SIGHUP) and report the outcome",
    )
    r.add_argument("--config", required=True, help="the config file the node was started with")
    r.set_defaults(func=cmd_config_reload)


def checked(path: str) -> Config:
    """Load the config file at ``path`` and check its routes and methods.

    Raises:
        ConfigError: the file is invalid (the message names the key).
    """
    from mr2nst.node.methods.registry import check_methods
    from mr2nst.node.service.routing import check_routes

    config = load_config(path)
    check_routes(config.routes)
    check_methods(config)
    return config


def cmd_config_check(args: argparse.Namespace) -> int:
    """Load and check a config file (keys, routes, methods); print a one-line verdict or JSON.

    Raises:
        ConfigError: the file is invalid (exit 2, the message names the key).
    """
    config = checked(args.file)
    if args.json:
        print_json(config.model_dump(mode="json"))
    else:
        print(
            f"{args.file}: OK ({plural(len(config.routes), 'route')}, "
            f"{plural(len(config.destinations), 'destination')})"
        )
    return EXIT_OK


def cmd_config_reload(args: argparse.Namespace) -> int:
    """Check ``--config``, send SIGHUP to the node running under its ``data_dir`` and wait
    for the node's verdict in its status file.

    Exit 0 when the node applied the file, 1 when it refused it, is not running or did
    not answer, 2 when the file itself is invalid (nothing is sent then).

    Raises:
        ConfigError: the file is invalid.
    """
    from mr2nst.node.service.health import read_status

    config = checked(args.config)
    data_dir = Path(config.node.data_dir).resolve()
    status = read_status(data_dir)
    if status is None:
        fail(f"no node is running under {data_dir} (no status file)")
        return EXIT_RUNTIME
    running, reason = status.running()
    if not running:
        fail(f"the node under {data_dir} is not running: {reason}")
        return EXIT_RUNTIME
    if status.host != socket.gethostname():
        fail(f"the node under {data_dir} runs on {status.host}; reload it there")
        return EXIT_RUNTIME
    before = status.reloaded_at
    os.kill(status.pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
        status = read_status(data_dir)
        if status is not None and status.reloaded_at != before:
            if status.reload_ok:
                print(f"reloaded {args.config}: {status.reload_detail}")
                return EXIT_OK
            fail(f"the node (pid {status.pid}) {status.reload_detail}")
            return EXIT_RUNTIME
    fail(f"the node (pid {status and status.pid}) did not report within {RELOAD_WAIT_S:.0f} s")
    return EXIT_RUNTIME


def fail(message: str) -> None:
    """One ``mr2nst: ...`` line on stderr."""
    print(f"mr2nst: {message}", file=sys.stderr)


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 route", "0 routes", "2 routes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
