"""Command line: ``dicomwatch run``, ``sort``, ``check-config`` and ``receive``.

Exit statuses are part of the interface (the systemd unit and cron jobs read them):
0 everything filed / clean stop, 1 something was quarantined or failed, 2 usage error,
78 bad configuration (EX_CONFIG; the unit does not restart on it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from dicomwatch import __version__
from dicomwatch.config import Config, load_config, prepare_folders, render_yaml, validate
from dicomwatch.errors import ConfigError
from dicomwatch.logconfig import setup_logging

EXIT_OK = 0
EXIT_FILES = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

log = logging.getLogger("dicomwatch")


Command = Callable[[argparse.Namespace, Config], int]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML config file (default: built-in: ./inbox -> ./archive)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="one line per file as text or JSON lines (overrides the config)",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="watch the inbox and file everything that lands there")
    _common(run)
    run.add_argument(
        "--once", action="store_true", help="file what is already settled in the inbox, then exit"
    )
    run.set_defaults(func=_cmd_run)


def _add_sort(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sort = sub.add_parser("sort", help="sort existing folders once")
    _common(sort)
    sort.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    sort.add_argument("--archive", type=Path, metavar="DST", help="archive folder")
    sort.add_argument(
        "--move", action="store_true", help="remove each source once its archive copy is durable"
    )
    sort.add_argument("--workers", type=int, metavar="N", help="worker processes (default: cores)")
    sort.add_argument(
        "--dry-run",
        action="store_true",
        help="print where each file would go and the collisions; write nothing",
    )
    progress = sort.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    sort.set_defaults(func=_cmd_sort)


def _add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", type=Path, metavar="FILE")
    check.set_defaults(func=_cmd_check_config)


def _add_receive(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    receive = sub.add_parser(
        "receive", help="receive DICOM over the network (C-STORE) into the inbox"
    )
    _common(receive)
    receive.set_defaults(func=_cmd_receive)


COMMANDS = (_add_run, _add_sort, _add_check_config, _add_receive)
"""Each command registers its own arguments and handler (``set_defaults(func=...)``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomwatch",
        description="File DICOM instances into a hierarchical archive, durably.",
    )
    parser.add_argument("--version", action="version", version=f"dicomwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    overrides: dict[str, object] = {}
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    if getattr(args, "archive", None) is not None:
        overrides["archive"] = args.archive
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        overrides["workers"] = args.workers
    if overrides:
        cfg = validate(replace(cfg, **overrides), source="command line")  # type: ignore[arg-type]
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return _config_error(exc)
    setup_logging(cfg.log_format, cfg.log_level)
    command: Command = args.func
    return command(args, cfg)


def _config_error(exc: ConfigError) -> int:
    print(f"dicomwatch: configuration error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    try:
        prepare_folders(cfg, create=False)
    except ConfigError as exc:
        return _config_error(exc)
    sys.stdout.write(render_yaml(cfg))
    return EXIT_OK


def _cmd_sort(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.batch import run_sort

    sources = [Path(s) for s in args.sources]
    for src in sources:
        if not src.exists():
            print(f"dicomwatch sort: {src}: no such file or folder", file=sys.stderr)
            return EXIT_USAGE
        real = src.resolve()
        for out in (cfg.archive, cfg.quarantine):
            if real == out or out in real.parents:
                print(f"dicomwatch sort: {src} is inside {out}", file=sys.stderr)
                return EXIT_USAGE
    if not args.dry_run:
        try:
            prepare_folders(cfg, include_inbox=False)
        except ConfigError as exc:
            return _config_error(exc)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        return run_sort(cfg, sources, move=args.move, dry_run=args.dry_run, progress=show)
    except KeyboardInterrupt:
        log.warning("interrupted; files not yet filed are still in their source folders")
        return 130


def _cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.daemon import Daemon

    try:
        prepare_folders(cfg)
    except ConfigError as exc:
        return _config_error(exc)
    return Daemon(cfg, config_path=args.config).run(once=args.once)


def _cmd_receive(args: argparse.Namespace, cfg: Config) -> int:
    try:
        from dicomwatch.receiver import run_receiver
    except ImportError as exc:
        print(
            f"dicomwatch receive: needs pynetdicom ({exc}); pip install 'dicomwatch[net]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from dicomwatch.receiver_config import load as load_receiver

    try:
        _, receiver = load_receiver(args.config)
        return run_receiver(cfg, receiver)
    except ConfigError as exc:
        return _config_error(exc)
