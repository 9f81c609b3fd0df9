"""``mr2nst config check``: validate a config file."""

from __future__ import annotations

import argparse
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, Parser, print_json
from mr2nst.node.config import load_config


def add_parser(sub: Any) -> None:
    """Register ``mr2nst config check``."""
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Load and check a config file (keys, routes, methods); print a one-line verdict or JSON.

    Raises:
        ConfigError: the file is invalid (exit 2, the message names the key).
    """
    from mr2nst.node.methods.registry import check_methods
    from mr2nst.node.service.routing import check_routes

    config = load_config(args.file)
    check_routes(config.routes)
    check_methods(config)
    if args.json:
        print_json(config.model_dump(mode="json"))
    else:
        print(
            f"{args.file}: OK ({plural(len(config.routes), 'route')}, "
            f"{plural(len(config.destinations), 'destination')})"
        )
    return EXIT_OK


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 route", "0 routes", "2 routes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
