"""``mr2nst serve``: run the node until SIGINT/SIGTERM; SIGHUP reloads its config file."""

from __future__ import annotations

import argparse
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, config_of
from mr2nst.node.logs import configure_logging


def add_parser(sub: Any) -> None:
    """Register ``mr2nst serve``."""
    p = sub.add_parser(
        "serve", help="run the node until SIGINT/SIGTERM (SIGHUP reloads routes and destinations)"
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--log-format",
        choices=["json", "console", "auto"],
        help="overrides logging.format: json lines, console for humans, auto = json "
        "unless stderr is a terminal",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node with ``--config`` until SIGINT/SIGTERM; exit 0 after a graceful stop."""
    from pathlib import Path

    from mr2nst.node.service.node import Node

    config = config_of(args)
    configure_logging(args.log_format or config.logging.format, config.logging.level)
    Node(config, Path(args.config).resolve()).serve_forever()
    return EXIT_OK
