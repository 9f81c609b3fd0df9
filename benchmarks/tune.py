"""Tune engine settings with the evaluation harness: one ``mr2nst evaluate`` per grid point.

    python benchmarks/tune.py --source s8/ge --target t40/uih --truth s8 --out tune \\
        --config base.toml --set alpha=1e2,1e3,1e4 --set lr=0.005,0.01,0.02 \\
        --set 'content_layers=["relu4_2"];["relu1_1","relu4_2"]'

Every combination of the ``--set KEY=V1,V2,...`` values (keys of the ``[engine]``
section; values that are lists themselves are separated by ``;``) is written into a copy
of ``--config`` and evaluated with ``--methods``
(default ``mr2nst``) into ``OUT/<point>/``. A point whose ``metrics.json`` already
exists is not rerun, so an interrupted sweep continues where it stopped. The table of
every point (mean ± sd of each metric of the first method) goes to ``OUT/tune.md`` and
``OUT/tune.json`` (also printed), ranked by ``--rank`` (default: SSIM to the true target
rendering, higher first). A point whose evaluation fails is reported on stderr and
left out of the table, and the script then exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

#: Metrics where lower is better; those in CLOSEST_TO_ONE rank by |mean - 1|; the others
#: rank higher first.
LOWER_IS_BETTER = ("style_gram", "hist_w1", "spectrum_dist", "seconds", "peak_mb")
CLOSEST_TO_ONE = ("uc_cnr_ratio", "sharpness_ratio")
#: The grid: each ``--set`` key with the values to try.
Axes = list[tuple[str, list[Any]]]
COLUMNS = (
    "style_gram",
    "hist_w1",
    "ssim",
    "psnr",
    "uc_cnr_ratio",
    "uc_detected",
    "spectrum_dist",
    "sharpness_ratio",
    "structure_ssim",
    "seconds",
)


def _value(text: str) -> Any:
    """A TOML scalar from the command line: number, boolean or bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _split(values: str) -> list[str]:
    """``V1,V2,...`` split at the commas outside brackets, or at ``;`` when there is one
    (so a list value such as ``["relu1_1","relu4_2"]`` stays whole)."""
    if ";" in values:
        return values.split(";")
    parts, depth, start = [], 0, 0
    for i, char in enumerate(values):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    return [*parts, values[start:]]


def _slug(value: Any) -> str:
    """A value as a folder-name part: lists joined by '+', nothing but [A-Za-z0-9_.+-]."""
    text = "+".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text)


def _config_text(base: dict[str, Any], engine: dict[str, Any]) -> str:
    """``base`` with ``engine`` merged into its [engine] table, as TOML (flat tables only)."""
    tables = {k: dict(v) for k, v in base.items() if isinstance(v, dict)}
    tables.setdefault("engine", {}).update(engine)
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def _score(metric: str, stats: dict[str, Any] | None) -> float:
    if not stats or stats.get("mean") is None:
        return float("-inf")
    mean = float(stats["mean"])
    if metric in CLOSEST_TO_ONE:
        return -abs(mean - 1.0)
    return -mean if metric in LOWER_IS_BETTER else mean


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any], Axes]:
    """The options, the base config and the grid's axes (exits 2 on a bad one)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--truth")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", required=True, type=Path, help="base node config (TOML)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an [engine] key and the values to try (repeatable)",
    )
    p.add_argument("--methods", default="mr2nst")
    p.add_argument("--rank", default="ssim", choices=COLUMNS)
    args = p.parse_args(argv)
    try:
        base = tomllib.loads(args.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        p.error(f"--config {args.config}: {exc}")
    axes: Axes = []
    for item in args.set:
        key, sep, values = item.partition("=")
        if not sep or not values:
            p.error(f"--set {item!r}: expected KEY=V1,V2,...")
        axes.append((key.strip(), [_value(v.strip()) for v in _split(values)]))
    return args, base, axes


def evaluate_point(
    args: argparse.Namespace, base: dict[str, Any], engine: dict[str, Any], point: Path
) -> bool:
    """``mr2nst evaluate`` of one grid point into ``point``; False when it failed."""
    point.mkdir(parents=True, exist_ok=True)
    config = point / "config.toml"
    config.write_text(_config_text(base, engine))
    cmd = [
        sys.executable,
        "-m",
        "mr2nst.node.cli.main",
        "evaluate",
        "--source",
        args.source,
        "--target",
        args.target,
        "--out",
        str(point),
        "--config",
        str(config),
        "--methods",
        args.methods,
    ]
    if args.truth:
        cmd += ["--truth", args.truth]
    print(f"tune: {point.name}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if done.returncode != 0:  # evaluate printed why on stderr; later points still run
        print(f"tune: {point.name}: mr2nst evaluate exited {done.returncode}", file=sys.stderr)
        return False
    return True


def table(rows: list[dict[str, Any]], axes: Axes) -> str:
    """The Markdown table of the points: the axes' values, then mean ± sd of each column."""
    header = [k for k, _ in axes] + list(COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["point"][k]) for k, _ in axes]
        for c in COLUMNS:
            s = row["metrics"].get(c)
            cells.append(
                "—" if not s or s.get("mean") is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Evaluate every grid point not yet done, then write and print the ranked table."""
    args, base, axes = parse_args(argv)
    method = args.methods.split(",")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    failed = 0
    for combo in itertools.product(*(values for _, values in axes)):
        engine = {key: value for (key, _), value in zip(axes, combo, strict=True)}
        name = "_".join(f"{k}-{_slug(v)}" for k, v in engine.items()) or "base"
        metrics_file = args.out / name / "metrics.json"
        if not metrics_file.exists() and not evaluate_point(args, base, engine, args.out / name):
            failed += 1
            continue
        metrics = json.loads(metrics_file.read_text())[method]
        rows.append({"point": engine, "metrics": {c: metrics.get(c) for c in COLUMNS}})
    rows.sort(key=lambda r: _score(args.rank, r["metrics"].get(args.rank)), reverse=True)
    text = table(rows, axes)
    (args.out / "tune.md").write_text(text)
    report = {"method": method, "rank": args.rank, "base_config": str(args.config), "rows": rows}
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
