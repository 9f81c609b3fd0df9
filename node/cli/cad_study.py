"""``mr2nst cad-study``: a detector tuned for UIH, on GE images before and after normalization.

The work is :func:`mr2nst.node.lab.cad_study.run_cad_study`; docs/cad-study.md describes
the study and a committed run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.lab import cad_study as lab


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def _ratios(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None


def add_parser(sub: Any) -> None:
    """Register ``mr2nst cad-study``."""
    p = sub.add_parser(
        "cad-study",
        help="detection study: a CAD trained on UIH, on GE images raw and normalized",
    )
    p.add_argument("--train", required=True, metavar="UIH_DIR", help="UIH training images")
    p.add_argument("--test-uih", required=True, metavar="DIR", help="UIH test images")
    p.add_argument(
        "--test-ge", required=True, metavar="DIR", help="GE test images (same names as UIH)"
    )
    p.add_argument(
        "--truth", required=True, metavar="DIR", help="ground truth <name>.json of the test set"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--train-truth", metavar="DIR", help="default: truth/ beside --train")
    p.add_argument(
        "--train-ge", metavar="GE_DIR", help="GE training images for Test B (with truth)"
    )
    p.add_argument("--train-ge-truth", metavar="DIR", help="default: truth/ beside --train-ge")
    p.add_argument(
        "--methods",
        type=_names,
        help="Test A methods (default: passthrough,ehm,mr2nst, plus fast/cyclegan when given)",
    )
    p.add_argument(
        "--test-b",
        type=_names,
        help="Test B normalizers (default: ehm, plus fast/cyclegan when given)",
    )
    p.add_argument(
        "--ratios", type=_ratios, default=(1, 2), help="GE:UIH training ratios (default 1,2)"
    )
    p.add_argument("--config", help="node config (engine and method settings)")
    p.add_argument("--epochs", type=int, help="detector epochs on the UIH training set")
    p.add_argument("--fast", metavar="PATH", help="fast student checkpoint: adds fast")
    p.add_argument("--cyclegan", metavar="PATH", help="CycleGAN checkpoint: adds cyclegan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--quiet", action="store_true", help="no JSON progress lines on stderr")
    p.set_defaults(func=cmd_cad_study)


def cmd_cad_study(args: argparse.Namespace) -> int:
    """Run the study (:func:`mr2nst.node.lab.cad_study.run_cad_study`).

    Raises:
        UsageError: bad inputs (exit 2, one line).
        ConfigError: an invalid config or a checkpoint that does not fit (exit 2).
    """
    from mr2nst.node.config import load_config

    given = tuple(name for name in ("fast", "cyclegan") if getattr(args, name))
    methods = args.methods or (*lab.TEST_A_METHODS, *given)
    test_b = args.test_b if args.test_b is not None else ("ehm", *given)
    config = load_config(args.config)
    study = lab.run_cad_study(
        config,
        lab.StudyInputs(
            train=Path(args.train),
            test_uih=Path(args.test_uih),
            test_ge=Path(args.test_ge),
            truth=Path(args.truth),
            train_truth=Path(args.train_truth) if args.train_truth else None,
            train_ge=Path(args.train_ge) if args.train_ge else None,
            train_ge_truth=Path(args.train_ge_truth) if args.train_ge_truth else None,
        ),
        lab.StudySettings(
            methods=methods,
            test_b=test_b,
            ratios=args.ratios,
            epochs=args.epochs,
            seed=args.seed,
            draws=args.draws,
            fast=args.fast,
            cyclegan=args.cyclegan,
        ),
        Path(args.out),
        command=" ".join(["mr2nst", *sys.argv[1:]]) if sys.argv else "",
        progress=not args.quiet,
    )
    print(
        f"cad-study: {len(study['test_a'])} Test A rows, {len(study['test_b'])} Test B rows "
        f"in {study['seconds'] / 60:.1f} min; report: {Path(args.out) / 'report.md'}"
    )
    return EXIT_OK
