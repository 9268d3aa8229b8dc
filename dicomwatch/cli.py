"""Command line: ``dicomwatch run``, ``sort``, ``check-config`` and ``receive``.

Exit statuses are part of the interface (the systemd unit and cron jobs read them):
0 everything filed / clean stop, 1 something was quarantined or failed, 2 usage error
(a bad option value included), 78 bad configuration (EX_CONFIG; the unit does not
restart on it), 130 interrupted (``sort`` on Ctrl-C, ``run`` on a second one).
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from dicomwatch import __version__
from dicomwatch.config import (
    Config,
    check_template,
    load_config,
    prepare_folders,
    render_yaml,
    validate,
)
from dicomwatch.errors import ConfigError
from dicomwatch.indexcli import INDEX_COMMANDS
from dicomwatch.indexdb import check_location
from dicomwatch.logconfig import setup_logging

EXIT_OK = 0
EXIT_FILES = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

log = logging.getLogger("dicomwatch")


Command = Callable[[argparse.Namespace, Config], int]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# ----- argument values: a bad one is a usage error (exit 2), named by argparse --------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _path(text: str) -> Path:
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(LOG_LEVELS)} (any case)"
        )
    return level


def _template(text: str) -> str:
    try:
        check_template(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ----- commands -----------------------------------------------------------------------

_FORMATTER = argparse.RawDescriptionHelpFormatter

_MAIN_EPILOG = """\
examples:
  dicomwatch run                         watch ./inbox, file into ./archive (quick start)
  dicomwatch run --config /etc/dicomwatch/config.yaml
  dicomwatch sort /media/cd --archive /srv/dicomwatch/archive
  dicomwatch check-config --config /etc/dicomwatch/config.yaml

exit statuses: 0 all filed / clean stop, 1 something quarantined or failed,
2 usage error, 78 bad configuration, 130 interrupted (Ctrl-C).
Run 'dicomwatch COMMAND --help' for a command's options.
"""

_RUN_EPILOG = """\
examples:
  dicomwatch run
      the quick start: ./inbox -> ./archive, bad files to ./quarantine; the three
      folders are made on the first start
  dicomwatch run --config /etc/dicomwatch/config.yaml
      as the systemd unit runs it; a missing inbox is refused (create_folders)
  dicomwatch run --config site.yaml --once -v
      file what is already in the inbox, with debug output, then exit (0 or 1)
  dicomwatch run --config site.yaml --log-format json --quarantine /data/bad

Command-line options override the config file, also after a reload (SIGHUP).
"""

_SORT_EPILOG = """\
examples:
  dicomwatch sort /media/cdrom --archive /srv/dicomwatch/archive
      copy every DICOM file below /media/cdrom into the archive
  dicomwatch sort old-exports/ --archive archive --move
      and remove each source once its archive copy is durable
  dicomwatch sort incoming/ --archive archive --dry-run
      print where each file would go and which names collide; write nothing
  dicomwatch sort a/ b/ c.dcm --config site.yaml --workers 2 -q
      the site's settings, two workers, only problems on the terminal
  runuser -u dicomwatch -- dicomwatch sort /media/cdrom --config /etc/dicomwatch/config.yaml
      into the service's archive: run as its user, so new folders belong to it

Exit status 0: every file filed; 1: something quarantined or failed.
"""

_CHECK_EPILOG = """\
examples:
  dicomwatch check-config --config /etc/dicomwatch/config.yaml
      print the effective settings (exit 0), or every problem, one a line (exit 78)
  dicomwatch check-config --quiet --config /etc/dicomwatch/config.yaml
      only the exit status and the problems (the unit's ExecReload= runs this)
  dicomwatch check-config
      the built-in quick-start set-up
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=_path,
        metavar="FILE",
        help="YAML config file (default: built-in: ./inbox -> ./archive)",
    )
    p.add_argument(
        "--quarantine",
        type=_path,
        metavar="DIR",
        help="quarantine folder for files that cannot be filed (overrides the config)",
    )
    p.add_argument(
        "--template",
        type=_template,
        metavar="T",
        help="archive path template, e.g. '{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm' "
        "(overrides the config)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="one line per file as text or JSON lines (overrides the config)",
    )
    level = p.add_mutually_exclusive_group()
    level.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="WARNING",
        help="only warnings and errors: quarantined and failed files, problems",
    )
    level.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="DEBUG",
        help="debug output as well",
    )
    level.add_argument(
        "--log-level",
        dest="log_level",
        type=_log_level,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (overrides the config's log_level)",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="watch the inbox and file everything that lands there",
        description="Watch the inbox and file every DICOM file that lands there, until "
        "stopped (SIGTERM, Ctrl-C).",
        epilog=_RUN_EPILOG,
        formatter_class=_FORMATTER,
    )
    _common(run)
    run.add_argument(
        "--once", action="store_true", help="file what is already settled in the inbox, then exit"
    )
    run.set_defaults(func=_cmd_run)


def _add_sort(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sort = sub.add_parser(
        "sort",
        help="sort existing folders once",
        description="Sort existing files and folders into the archive once, with the "
        "engine the daemon uses.",
        epilog=_SORT_EPILOG,
        formatter_class=_FORMATTER,
    )
    _common(sort)
    sort.add_argument(
        "sources",
        nargs="+",
        type=_path,
        metavar="SRC",
        help="a file, or a folder whose files are all considered (not only *.dcm)",
    )
    sort.add_argument("--archive", type=_path, metavar="DST", help="archive folder")
    sort.add_argument(
        "--move", action="store_true", help="remove each source once its archive copy is durable"
    )
    sort.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes, at least 1 (default: the config's workers; 0 there means "
        "one per core)",
    )
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
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar, even on a terminal",
    )
    sort.set_defaults(func=_cmd_sort)


def _add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check-config",
        help="validate and print the effective config",
        description="Validate a config file as 'run' would at start, and print the "
        "effective settings.",
        epilog=_CHECK_EPILOG,
        formatter_class=_FORMATTER,
    )
    check.add_argument(
        "--config",
        type=_path,
        metavar="FILE",
        help="YAML config file to check (default: the built-in quick-start set-up)",
    )
    check.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing when the config is good (the error and exit 78 when not)",
    )
    check.set_defaults(func=_cmd_check_config)


def _add_receive(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    receive = sub.add_parser(
        "receive", help="receive DICOM over the network (C-STORE) into the inbox"
    )
    _common(receive)
    receive.set_defaults(func=_cmd_receive)


COMMANDS = (_add_run, _add_sort, _add_check_config, _add_receive, *INDEX_COMMANDS)
"""Each command registers its own arguments and handler (``set_defaults(func=...)``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomwatch",
        description="File DICOM instances into a hierarchical archive, durably.",
        epilog=_MAIN_EPILOG,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"dicomwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """Settings the command line gives; they win over the config file, on reload too."""
    overrides: dict[str, object] = {}
    for key in ("log_format", "log_level", "archive", "quarantine", "template", "workers"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    overrides = _overrides(args)
    if args.command in ("run", "check-config") and args.config is None:
        # The quick start: ./inbox, ./archive and ./quarantine appear on the first run
        # (and check-config without a file checks that set-up).
        overrides["create_folders"] = True
    if overrides:
        cfg = validate(replace(cfg, **overrides), source="command line")  # type: ignore[arg-type]
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return _config_error(exc)
    setup_logging(cfg.log_format, cfg.log_level)
    command: Command = args.func
    return command(args, cfg)


def _config_error(exc: ConfigError) -> int:
    """Each problem on its own line, each line whole (journald stores lines apart)."""
    for line in str(exc).splitlines() or [""]:
        print(f"dicomwatch: configuration error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    try:
        prepare_folders(cfg, create=False)
    except ConfigError as exc:
        return _config_error(exc)
    if not args.quiet:
        sys.stdout.write(render_yaml(cfg))
    return EXIT_OK


def _cmd_sort(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.batch import run_sort
    from dicomwatch.sources import overlapping_source

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
    # By device and inode too, before any folder is made: the archive under another name
    # (a symlink, a bind mount) is still the archive.
    overlap = overlapping_source(sources, [cfg.archive, cfg.quarantine])
    if overlap is not None:
        print(f"dicomwatch sort: {overlap}", file=sys.stderr)
        return EXIT_USAGE
    if not args.dry_run:
        _warn_root_into_foreign_archive(cfg.archive, args.argv)
        try:
            prepare_folders(cfg, include_inbox=False)
            check_location(cfg)
        except ConfigError as exc:
            return _config_error(exc)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        return run_sort(cfg, sources, move=args.move, dry_run=args.dry_run, progress=show)
    except KeyboardInterrupt:
        log.warning("interrupted; files not yet filed are still in their source folders")
        return EXIT_INTERRUPTED


def _warn_root_into_foreign_archive(archive: Path, argv: Sequence[str]) -> None:
    """``sort`` as root into an archive that another user (the service's) owns.

    The folders and files made now belong to root, and the daemon, running as that
    user, then fails with permission_denied on every file that goes into one of them.
    Said once, at start; the command to run instead is spelled out.
    """
    if os.geteuid() != 0:
        return
    place = archive
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent  # a missing archive is made in its parent, as root
    try:
        st = place.stat()
    except OSError:
        return  # prepare_folders reports it
    if st.st_uid == 0:
        return
    command = shlex.join(["dicomwatch", *argv])
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        as_owner = f"runuser -u {name} -- {command}"
    except KeyError:  # an id without an account here (an NFS export's, say)
        name = f"uid {st.st_uid}"
        as_owner = f"setpriv --reuid={st.st_uid} --regid={st.st_gid} --clear-groups {command}"
    what = "the archive" if place == archive else f"the archive's folder {place}"
    log.warning(
        "%s belongs to %s; folders made now will belong to root — run as that user: %s",
        what,
        name,
        as_owner,
    )


def _cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.daemon import Daemon

    try:
        prepare_folders(cfg)
        check_location(cfg)
    except ConfigError as exc:
        return _config_error(exc)
    return Daemon(cfg, config_path=args.config, overrides=_overrides(args)).run(once=args.once)


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
