"""The ``mr2nst`` command: the composition root that wires config, logging and services.

Exit codes: 0 success, 2 usage or config error (one-line reason), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path
from typing import Any

from mr2nst.bank.errors import BankError
from mr2nst.core.errors import EngineConfigError, RefinerError, WeightsError

from .config import Config, load_config
from .errors import ConfigError, NodeError
from .logs import configure_logging, get_logger
from .version import VERSION

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

# Commands that live in their own node modules; each module has ``add_parser(subparsers)``
# and keeps heavy imports inside its command function.
COMMAND_MODULES: tuple[str, ...] = ("evaluate", "bench", "train_refiner")

log = get_logger("mr2nst.cli")


class UsageError(Exception):
    """Bad command-line usage; exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# -- commands --------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .service import Node

    config = _config(args)
    configure_logging(config.logging.format, config.logging.level)
    Node(config).serve_forever()
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from .methods import check_methods
    from .routing import check_routes

    config = load_config(args.file)
    check_routes(config.routes)
    check_methods(config)
    if args.json:
        _print_json(config.model_dump(mode="json"))
    else:
        print(f"{args.file}: OK ({len(config.routes)} routes, {len(config.destinations)} destinations)")
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from .scu import echo

    status, error = echo(args.host, args.port, calling=args.aet, called=args.aec, timeout_s=args.timeout)
    ok = status == 0
    if args.json:
        _print_json({"ok": ok, "status": status, "error": error})
    else:
        print(f"C-ECHO {args.aec}@{args.host}:{args.port}: " + (f"status 0x{status:04X}" if status is not None else error))
    return EXIT_OK if ok else EXIT_RUNTIME


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .scu import iter_files, read_file, store_datasets

    files = list(iter_files(args.paths))
    if not files:
        raise UsageError("send: no files found")
    results: list[dict[str, Any]] = []
    batch: list[tuple[str, Any]] = []

    def flush() -> None:
        for out in store_datasets(batch, args.host, args.port, calling=args.aet, called=args.aec,
                                  timeout_s=args.timeout):
            results.append({"path": out.path, "status": out.status, "error": out.error})
        batch.clear()

    for path in tqdm(files, desc="send", unit="file", disable=not sys.stderr.isatty()):
        try:
            batch.append((str(path), read_file(path)))
        except ValueError as exc:
            results.append({"path": str(path), "status": None, "error": str(exc)})
        if len(batch) >= 16:
            flush()
    if batch:
        flush()
    sent = sum(1 for r in results if r["status"] is not None and r["status"] in (0, 0xB000, 0xB006, 0xB007))
    if args.json:
        _print_json({"sent": sent, "failed": len(results) - sent, "results": results})
    else:
        for r in results:
            if r["status"] not in (0, 0xB000, 0xB006, 0xB007):
                status = f"0x{r['status']:04X}" if r["status"] is not None else r["error"]
                print(f"FAILED {r['path']}: {status}", file=sys.stderr)
        print(f"sent {sent} of {len(results)} to {args.aec}@{args.host}:{args.port}")
    return EXIT_OK if sent == len(results) else EXIT_RUNTIME


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def cmd_queue(args: argparse.Namespace) -> int:
    from .forwarder import remove_files
    from .ledger import Ledger
    from .spool import Spool

    config = _config(args)
    ledger = Ledger.open(config.ledger_url)
    try:
        if args.action == "list":
            rows = ledger.queue(include_done=args.all, limit=args.limit)
            if args.json:
                _print_json({"counts": ledger.counts(), "items": rows})
                return EXIT_OK
            for r in rows:
                dels = " ".join(f"{d['destination']}={d['state']}({d['attempts']})" for d in r["deliveries"])
                print(f"{r['id']:>6} {r['state']:<11} {r['action']:<9} {r['route'] or '-':<12} "
                      f"{_when(r['received_at'])} {dels} {r['error'] or ''}".rstrip())
            print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(ledger.counts().items())))
        elif args.action == "retry":
            n = ledger.retry(args.ids)
            _print_json({"revived": n}) if args.json else print(f"revived {n} item(s)")
        else:  # purge
            rows = ledger.purge(args.ids)
            removed = remove_files(rows, Spool(config.node.data_dir))
            ledger.forget_paths([r["id"] for r in rows])
            _print_json({"purged": len(rows), "files_removed": removed}) if args.json else print(
                f"purged {len(rows)} instance(s), removed {removed} file(s)")
    finally:
        ledger.close()
    return EXIT_OK


def cmd_bank(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mr2nst.bank.bank import Bank, iter_files

    root = Path(args.bank) if args.bank else load_config(args.config).bank.path
    bank = Bank(root)
    if args.action == "add":
        if not args.items:
            raise UsageError("bank add: give files or folders to add")
        total = len(iter_files(args.items))
        with tqdm(total=total, desc="bank add", unit="file", disable=not sys.stderr.isatty()) as bar:
            report = bank.add(args.items, progress=lambda _p: bar.update())
        if args.json:
            _print_json({"added": [e.sop_instance_uid for e in report.added], "already": report.already,
                         "rejected": [{"file": f, "reason": r} for f, r in report.rejected]})
        else:
            for file, reason in report.rejected:
                print(f"rejected {file}: {reason}", file=sys.stderr)
            print(f"added {len(report.added)}, already in the bank {len(report.already)}, "
                  f"rejected {len(report.rejected)} ({root}: {len(bank.entries())} references)")
        return EXIT_OK if not report.rejected else EXIT_RUNTIME
    if args.action == "list":
        entries = bank.entries()
        if args.json:
            _print_json([{k: v for k, v in e.to_json().items() if k != "histogram"} for e in entries])
        else:
            for e in entries:
                print(f"{e.sop_instance_uid}  {e.view:<3} {e.laterality}  {e.breast_area_mm2:>9.0f} mm2  "
                      f"{e.bits_stored} bit {e.photometric:<11} {e.manufacturer} {e.model}".rstrip())
            print(f"{len(entries)} references in {root}")
        return EXIT_OK
    if args.action == "remove":
        if len(args.items) != 1:
            raise UsageError("bank remove: give exactly one SOP Instance UID")
        entry = bank.remove(args.items[0])
        _print_json({"removed": entry.sop_instance_uid}) if args.json else print(f"removed {entry.sop_instance_uid}")
        return EXIT_OK
    problems = bank.verify()
    if args.json:
        _print_json({"references": len(bank.entries()), "problems": problems})
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(bank.entries())} references, {len(problems)} problem(s)")
    return EXIT_OK if not problems else EXIT_RUNTIME


def cmd_phantom(args: argparse.Namespace) -> int:
    from mr2nst.core.errors import ImageError

    from .phantom_io import run_phantom_command

    vendors = ("GE", "UIH") if args.vendor == "both" else (args.vendor.upper(),)
    try:
        paths = run_phantom_command(Path(args.out), n=args.n, size=(args.size[0], args.size[1]),
                                    seed=args.seed, vendors=vendors, j2k=args.j2k,
                                    photometric=args.photometric, bits=args.bits,
                                    progress=sys.stderr.isatty())
    except (ValueError, ImageError) as exc:
        raise UsageError(f"phantom: {exc}") from None
    print(f"wrote {len(paths)} files under {args.out}")
    return EXIT_OK


def cmd_transfer(args: argparse.Namespace) -> int:
    from .transfer import run_transfer

    config = load_config(args.config)
    results = run_transfer(config, args.inputs, Path(args.out), method=args.method,
                           progress=sys.stderr.isatty())
    failed = [r for r in results if r["error"]]
    if args.json:
        _print_json({"written": len(results) - len(failed), "failed": len(failed), "results": results})
    else:
        for r in failed:
            print(f"FAILED {r['input']}: {r['error']}", file=sys.stderr)
        print(f"wrote {len(results) - len(failed)} of {len(results)} derived instances to {args.out}")
    return EXIT_OK if not failed else EXIT_RUNTIME


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return EXIT_OK if run_demo(Path(args.out), n=args.n, size=(args.size[0], args.size[1])) else EXIT_RUNTIME


# -- parser ----------------------------------------------------------------------------

def _net(p: argparse.ArgumentParser) -> None:
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default="MR2NST_SCU", help="our (calling) AE title")
    p.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mr2nst", description="DICOM node that normalizes GE mammograms to UIH style (mr2NST).")
    parser.add_argument("--version", action="version", version=f"mr2nst {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the node until SIGINT/SIGTERM")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="self-contained end-to-end run on this machine")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--n", type=int, default=3, help="number of phantom GE images to send")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("transfer", help="normalize files offline with the same pipeline")
    p.add_argument("inputs", nargs="+", metavar="IN")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--method", default="passthrough")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("echo", help="C-ECHO a peer")
    _net(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    _net(p)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("queue", help="inspect and manage the ledger")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("ids", nargs="*", type=int, help="job ids (default: all)")
    p.add_argument("--config")
    p.add_argument("--all", action="store_true", help="list: include finished instances")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("bank", help="manage the reference bank of target-domain (UIH) images")
    p.add_argument("action", choices=["add", "list", "remove", "verify"])
    p.add_argument("items", nargs="*", metavar="PATH|UID", help="add: files or folders; remove: a SOP Instance UID")
    p.add_argument("--bank", help="bank directory (default: bank.path of --config)")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("phantom", help="write synthetic paired GE/UIH mammograms")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vendor", choices=["ge", "uih", "both"], default="both")
    p.add_argument("--j2k", action="store_true", help="JPEG 2000 lossless")
    p.add_argument("--photometric", choices=["MONOCHROME1", "MONOCHROME2"])
    p.add_argument("--bits", type=int, choices=[12, 14, 16])
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_check)

    for name in COMMAND_MODULES:
        import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (UsageError, ConfigError, EngineConfigError, WeightsError, RefinerError) as exc:
        print(f"mr2nst: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except (NodeError, BankError) as exc:
        print(f"mr2nst: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    # Run through the package's module, not this __main__ copy: the command modules import
    # UsageError & co. from mr2nst.node.cli, and main() must catch those same classes.
    from mr2nst.node.cli import main as package_main

    sys.exit(package_main())
