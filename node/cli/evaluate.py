"""``mr2nst evaluate``: metrics, paired tests, report and figures.

The work is :mod:`mr2nst.node.lab.evaluate`; docs/evaluation.md describes the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, print_json
from mr2nst.node.errors import UsageError
from mr2nst.node.lab import evaluate as lab


def add_parser(sub: Any) -> None:
    """Register ``mr2nst evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate normalization methods on paired or real data")
    p.add_argument("--source", required=True, help="source-domain DICOMs (the test set)")
    p.add_argument(
        "--target", required=True, help="target-domain DICOMs: bank references + held-out"
    )
    p.add_argument(
        "--truth", help="true target rendering of each source (same file names) + ground truth"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(lab.METHODS)}")
    p.add_argument("--config", help="node config (its [engine] section sets the engine)")
    p.add_argument("--refiner", help="trained refiner checkpoint: adds the mr2nst_trained row")
    p.add_argument(
        "--fast",
        metavar="PATH",
        help="fast student checkpoint (mr2nst train-fast, for this run's mr2nst method and "
        "bank): adds the fast row",
    )
    p.add_argument(
        "--cyclegan",
        metavar="PATH",
        help="CycleGAN checkpoint (mr2nst train-cyclegan): adds the cyclegan row",
    )
    p.add_argument(
        "--domain-source", help="source-domain DICOMs held apart, for the domain classifier"
    )
    p.add_argument(
        "--classifier-steps", type=int, default=150, help="domain classifier training steps"
    )
    p.add_argument("--json", action="store_true", help="print metrics.json on stdout")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the methods (:func:`mr2nst.node.lab.evaluate.run_evaluation`).

    Raises:
        UsageError: an unknown method, or an input that is not a directory (exit 2).
    """
    from mr2nst.node.config import load_config

    methods = lab.parse_methods(args.methods, UsageError)
    if args.refiner:
        methods = (*methods, lab.TRAINED)
    if args.fast:
        methods = (*methods, lab.FAST)
    if args.cyclegan:
        methods = (*methods, lab.CYCLEGAN)
    for name in ("source", "target", "truth", "domain_source"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"evaluate: --{name.replace('_', '-')} {value}: not a directory")
    config = load_config(args.config)
    result = lab.run_evaluation(
        config,
        Path(args.source),
        Path(args.target),
        Path(args.out),
        methods,
        truth=Path(args.truth) if args.truth else None,
        domain_source=Path(args.domain_source) if args.domain_source else None,
        refiner=args.refiner,
        fast=args.fast,
        cyclegan=args.cyclegan,
        classifier_steps=args.classifier_steps,
        command=" ".join(["mr2nst", *sys.argv[1:]]) if sys.argv else "",
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print_json(result)
    else:
        print(f"evaluated {len(methods)} methods; report: {Path(args.out) / 'report.md'}")
    return EXIT_OK
