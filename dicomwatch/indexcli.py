"""The index's commands: ``find``, ``series``, ``studies``, ``quarantine``, ``index``.

The query commands only read (SQLite in WAL mode lets them run while the daemon
writes).  Text output is aligned columns for a person; ``--json`` gives one JSON object
per line for a script.  Every filter reaches the database as a bound parameter.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dicomwatch.config import Config
from dicomwatch.indexdb import Index, IndexError_, open_index, parse_time, utc_text

EXIT_OK = 0
EXIT_DIFFERENCES = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


# ----------------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if text.isprintable() and text:
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or '""'


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """JSON lines, or aligned columns with a header line (nothing at all for no rows)."""
    out = sys.stdout
    if as_json:
        for row in rows:
            out.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")
        return
    if not rows:
        return
    table = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


# ----------------------------------------------------------------------------- filters

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def time_arg(text: str) -> str:
    """``--since``/``--until``: ISO 8601 (UTC unless it says otherwise) or an age
    such as ``30m``, ``2h``, ``7d``."""
    match = _RELATIVE.match(text.strip())
    try:
        if match:
            ago = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
            return utc_text(datetime.now(UTC) - ago)
        return utc_text(parse_time(text))
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time (ISO 8601 such as 2024-05-01 or 2024-05-01T12:00, "
            "or an age such as 30m, 2h, 7d)"
        ) from exc


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def glob_to_like(pattern: str) -> str:
    """``*`` and ``?`` of a shell glob as LIKE's ``%`` and ``_``; everything else literal."""
    return "".join("%" if c == "*" else "_" if c == "?" else like_escape(c) for c in pattern)


class Where:
    """``WHERE`` clauses and their parameters, built from constant column names."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def equals(self, column: str, value: str | None) -> None:
        if value is not None:
            self.clauses.append(f"{column} = ?")
            self.params.append(value)

    def time(self, column: str, op: str, value: str | None) -> None:
        if value is not None:
            self.clauses.append(f"{column} {op} ?")
            self.params.append(self.index.dialect.time_in(value))

    def source(self, pattern: str | None) -> None:
        if pattern is None:
            return
        if "*" in pattern or "?" in pattern:
            self.clauses.append("source LIKE ? ESCAPE '\\'")
            self.params.append(glob_to_like(pattern))
        else:  # a name: the whole source, or its last component(s)
            self.clauses.append("(source = ? OR source LIKE ? ESCAPE '\\')")
            self.params += [pattern, "%/" + like_escape(pattern)]

    def sql(self) -> str:
        return (" WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


# ----------------------------------------------------------------------------- commands

Handler = Callable[[argparse.Namespace, Config, Index], int]


def _with_index(handler: Handler) -> Callable[[argparse.Namespace, Config], int]:
    def run(args: argparse.Namespace, cfg: Config) -> int:
        if cfg.index == "none":
            print(
                f"dicomwatch {args.command}: the index is turned off (index: none)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        try:
            index = open_index(cfg, create=False)
        except IndexError_ as exc:
            print(f"dicomwatch {args.command}: {exc}", file=sys.stderr)
            return EXIT_DIFFERENCES
        with index:
            return handler(args, cfg, index)

    return run


def _common(p: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    if json_output:
        p.add_argument("--json", action="store_true", help="one JSON object per line")


FIND_FIELDS = (
    "time",
    "outcome",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "source",
    "path",
)


def _find(args: argparse.Namespace, cfg: Config, index: Index) -> int:
    where = Where(index)
    where.equals("sop_instance_uid", args.sop_instance_uid)
    where.equals("series_instance_uid", args.series_instance_uid)
    where.equals("study_instance_uid", args.study_instance_uid)
    where.equals("patient_id", args.patient_id)
    where.source(args.source)
    where.time("time", ">=", args.since)
    where.time("time", "<", args.until)
    rows = index.select(
        "SELECT time, outcome, sop_instance_uid, series_instance_uid, "  # noqa: S608
        "study_instance_uid, patient_id, source, path FROM instances"
        f"{where.sql()} ORDER BY time, id",
        where.params,
    )
    for row in rows:
        row["path"] = str(cfg.archive / row["path"])
    emit(rows, FIND_FIELDS, args.json)
    return EXIT_OK


def _add_find(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("find", help="where the archive holds an instance, series, study or patient")
    _common(p)
    p.add_argument("--sop-instance-uid", metavar="UID")
    p.add_argument("--series-instance-uid", metavar="UID")
    p.add_argument("--study-instance-uid", metavar="UID")
    p.add_argument("--patient-id", metavar="ID")
    p.add_argument("--source", metavar="NAME-OR-GLOB", help="the file's name as it arrived")
    p.add_argument("--since", type=time_arg, metavar="TIME", help="filed at or after TIME")
    p.add_argument("--until", type=time_arg, metavar="TIME", help="filed before TIME")
    p.set_defaults(func=_with_index(_find))


SERIES_FIELDS = (
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "modality",
    "series_number",
    "instances",
    "first_arrival",
    "last_arrival",
    "folder",
)
STUDY_FIELDS = (
    "study_instance_uid",
    "patient_id",
    "study_date",
    "series",
    "instances",
    "first_arrival",
    "last_arrival",
    "folder",
)


def _aggregate(table: str, fields: Sequence[str]) -> Handler:
    def handler(args: argparse.Namespace, cfg: Config, index: Index) -> int:
        where = Where(index)
        where.equals("study_instance_uid", args.study_instance_uid)
        where.equals("patient_id", args.patient_id)
        rows = index.select(
            f"SELECT {', '.join(fields)} FROM {table}{where.sql()} "  # noqa: S608
            "ORDER BY first_arrival",
            where.params,
        )
        for row in rows:
            if row["folder"] is not None:
                row["folder"] = str(cfg.archive / row["folder"])
        emit(rows, fields, args.json)
        return EXIT_OK

    return handler


def _add_series(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("series", help="series in the archive: counts, arrivals, folder")
    _common(p)
    p.add_argument("--study-instance-uid", metavar="UID")
    p.add_argument("--patient-id", metavar="ID")
    p.set_defaults(func=_with_index(_aggregate("series", SERIES_FIELDS)))


def _add_studies(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("studies", help="studies in the archive: counts, arrivals, folder")
    _common(p)
    p.add_argument("--study-instance-uid", metavar="UID")
    p.add_argument("--patient-id", metavar="ID")
    p.set_defaults(func=_with_index(_aggregate("studies", STUDY_FIELDS)))


QUARANTINE_FIELDS = ("time", "reason", "path", "source", "message")


def _quarantine_list(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.index == "none":
        from dicomwatch.rebuild import quarantine_files, quarantine_row

        rows = [
            asdict(r)
            for r in (quarantine_row(cfg, rel) for rel in quarantine_files(cfg))
            if (args.reason is None or r.reason == args.reason)
            and (args.since is None or (r.time or "") >= args.since)
        ]
        rows.sort(key=lambda r: r["time"] or "")
    else:
        try:
            index = open_index(cfg, create=False)
        except IndexError_ as exc:
            print(f"dicomwatch quarantine list: {exc}", file=sys.stderr)
            return EXIT_DIFFERENCES
        with index:
            where = Where(index)
            where.equals("reason", args.reason)
            where.time("time", ">=", args.since)
            rows = index.select(
                "SELECT time, reason, path, source, message FROM quarantine"  # noqa: S608
                f"{where.sql()} ORDER BY time, id",
                where.params,
            )
    for row in rows:
        row["path"] = str(cfg.quarantine / row["path"])
    emit(rows, QUARANTINE_FIELDS, args.json)
    return EXIT_OK


def _add_quarantine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("quarantine", help="list quarantined files, or send them back to the inbox")
    qsub = p.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    ls = qsub.add_parser("list", help="quarantined files with their reasons")
    _common(ls)
    ls.add_argument("--reason", metavar="R", help="only this reason (e.g. decode_error)")
    ls.add_argument("--since", type=time_arg, metavar="TIME", help="quarantined at or after")
    ls.set_defaults(func=_quarantine_list)
    retry = qsub.add_parser(
        "retry", help="move quarantined files back into the inbox to be filed again"
    )
    _common(retry, json_output=False)
    retry.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    which = retry.add_mutually_exclusive_group()
    which.add_argument("--reason", metavar="R", help="every file quarantined for this reason")
    which.add_argument("--all", action="store_true", help="every quarantined file")
    retry.add_argument("--dry-run", action="store_true", help="say what would be moved")
    retry.set_defaults(func=_quarantine_retry)


def _quarantine_retry(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.requeue import retry_command

    return retry_command(args, cfg)


def _index_rebuild(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.rebuild import rebuild

    if cfg.index == "none":
        print("dicomwatch index rebuild: the index is turned off (index: none)", file=sys.stderr)
        return EXIT_CONFIG
    started = time.monotonic()
    try:
        with open_index(cfg) as index:
            report = rebuild(cfg, index)
    except IndexError_ as exc:
        print(f"dicomwatch index rebuild: {exc}", file=sys.stderr)
        return EXIT_DIFFERENCES
    elapsed = max(time.monotonic() - started, 1e-9)
    print(
        f"index rebuilt from {report.files} archived and {report.quarantined} quarantined "
        f"files in {elapsed:.1f} s ({report.files / elapsed:.0f} files/s): {report.added} "
        f"rows added, {report.removed} removed, {len(report.unreadable)} files not DICOM"
    )
    return EXIT_OK


def _index_check(args: argparse.Namespace, cfg: Config) -> int:
    from dicomwatch.rebuild import check

    def run(index: Index) -> int:
        report = check(cfg, index)
        if not report.clean:
            # A running daemon writes its rows within a second or two of filing.
            time.sleep(2.5)
            again = check(cfg, index)
            report.rows_without_files = sorted(
                set(report.rows_without_files) & set(again.rows_without_files)
            )
            report.files_without_rows = sorted(
                set(report.files_without_rows) & set(again.files_without_rows)
            )
        for path in report.rows_without_files:
            print(f"row without file: {_cell(path)}")
        for path in report.files_without_rows:
            print(f"file without row: {_cell(path)}")
        if report.clean:
            print("index matches the archive and the quarantine")
            return EXIT_OK
        print(
            f"{len(report.rows_without_files)} rows without files, "
            f"{len(report.files_without_rows)} files without rows; "
            "'dicomwatch index rebuild' makes the index match",
            file=sys.stderr,
        )
        return EXIT_DIFFERENCES

    return _with_index(lambda _a, _c, index: run(index))(args, cfg)


def _add_index(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("index", help="rebuild the index from the files, or check it against them")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    rebuild = isub.add_parser("rebuild", help="make the index match the archive and quarantine")
    _common(rebuild, json_output=False)
    rebuild.set_defaults(func=_index_rebuild)
    check = isub.add_parser("check", help="rows without files and files without rows (exit 1)")
    _common(check, json_output=False)
    check.set_defaults(func=_index_check)


INDEX_COMMANDS = (_add_find, _add_series, _add_studies, _add_quarantine, _add_index)
"""Registered by ``dicomwatch.cli`` after its own commands."""
