"""The archive index: one row per filed instance and per quarantined file.

The index is derived data.  The archive and the quarantine (with its sidecars) are the
truth; the index only makes "where is this SOP instance?" a query instead of a walk.
A lost or stale index is rebuilt from the files (``dicomwatch index rebuild``), and an
unavailable one never stops filing: the parent buffers rows and catches up.

Two engines behind one interface: SQLite (the default, one file in ``state_dir``, WAL so
the read-only commands work while the daemon writes) and PostgreSQL (psycopg 3, for
several nodes or an index off the host).  Every value reaches the database as a bound
parameter, never formatted into SQL text.

The schema is versioned from its first release: ``meta.schema_version`` (and SQLite's
``PRAGMA user_version``) says which migrations have run, each migration moves one
version up inside one transaction, and an index newer than this code is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomwatch.config import Config
from dicomwatch.errors import ConfigError
from dicomwatch.fstype import filesystem_magic, network_filesystem

log = logging.getLogger(__name__)

SQLITE_NAME = "index.sqlite3"
BUSY_TIMEOUT_MS = 5000
CHUNK = 500
"""Most values in one ``IN (...)`` list (SQLite allows 32766; smaller keeps plans simple)."""


class IndexError_(Exception):
    """The index cannot be used now (missing, locked, corrupt, server down)."""


class IndexMissing(IndexError_):
    """No index exists yet where the config says."""


@dataclass(frozen=True)
class InstanceRow:
    """One archived file.  ``path`` is relative to the archive root, with ``/``."""

    sop_instance_uid: str
    path: str
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    study_date: str | None = None
    series_number: str | None = None
    instance_number: str | None = None
    size: int | None = None
    sha256: str | None = None
    transfer_syntax: str | None = None
    source: str | None = None
    outcome: str = "sorted"
    node: str | None = None
    time: str | None = None
    """UTC, ``YYYY-MM-DDTHH:MM:SS.mmmZ``; None means now."""

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.path)


@dataclass(frozen=True)
class QuarantineRow:
    """One quarantined file.  ``path`` is relative to the quarantine root."""

    path: str
    reason: str
    message: str | None = None
    source: str | None = None
    sop_instance_uid: str | None = None
    node: str | None = None
    time: str | None = None


INSTANCE_COLUMNS = tuple(f.name for f in fields(InstanceRow))
QUARANTINE_COLUMNS = tuple(f.name for f in fields(QuarantineRow))


def utc_text(moment: datetime) -> str:
    """The one time format stored and printed: UTC, milliseconds, ``Z``."""
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def now_text() -> str:
    return utc_text(datetime.now(UTC))


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time (UTC when no offset is given)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def clean_text(value: str | None) -> str | None:
    """Text every engine accepts: a lone surrogate (a non-UTF-8 file name read with
    ``surrogateescape``) becomes a ``\\udcXX`` escape, as the quarantine sidecar writes
    it, so the live row and a rebuilt one agree."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


# ----------------------------------------------------------------------------- engines


class _Dialect:
    """What differs between SQLite and PostgreSQL, and nothing else."""

    name = "sqlite"
    serial = "INTEGER PRIMARY KEY"
    time_type = "TEXT"
    now = "(strftime('%Y-%m-%dT%H:%M:%fZ','now'))"

    def sql(self, text: str) -> str:
        return text

    def value(self, value: Any) -> Any:
        return clean_text(value) if isinstance(value, str) else value

    def time_in(self, text: str | None) -> Any:
        return text

    def time_out(self, value: Any) -> str | None:
        return None if value is None else str(value)


class _PostgresDialect(_Dialect):
    name = "postgresql"
    serial = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    time_type = "TIMESTAMPTZ"
    now = "now()"

    def sql(self, text: str) -> str:
        # psycopg's placeholder; no SQL text here holds a literal '%' or '?'.
        return text.replace("?", "%s")

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            # PostgreSQL text cannot hold NUL; the same mapping applies to queries.
            return (clean_text(value) or "").replace("\x00", "\ufffd")
        return value

    def time_in(self, text: str | None) -> Any:
        return None if text is None else parse_time(text)

    def time_out(self, value: Any) -> str | None:
        if value is None:
            return None
        return utc_text(value) if isinstance(value, datetime) else str(value)


# ----------------------------------------------------------------------------- schema

Migration = Callable[["Index"], None]


def _v1_tables(ix: Index) -> None:
    """Instances and quarantined files; the queries group instances themselves."""
    d = ix.dialect
    ix.execute(
        f"""CREATE TABLE instances (
            id {d.serial},
            sop_instance_uid TEXT NOT NULL,
            path TEXT NOT NULL,
            series_instance_uid TEXT,
            study_instance_uid TEXT,
            patient_id TEXT,
            modality TEXT,
            study_date TEXT,
            series_number TEXT,
            instance_number TEXT,
            size BIGINT,
            sha256 TEXT,
            transfer_syntax TEXT,
            source TEXT,
            outcome TEXT NOT NULL,
            node TEXT,
            time {d.time_type} NOT NULL,
            indexed_at {d.time_type} NOT NULL DEFAULT {d.now},
            UNIQUE (sop_instance_uid, path)
        )"""
    )
    for column in ("series_instance_uid", "study_instance_uid", "patient_id", "time"):
        ix.execute(f"CREATE INDEX instances_{column} ON instances ({column})")
    ix.execute(
        f"""CREATE TABLE quarantine (
            id {d.serial},
            path TEXT NOT NULL UNIQUE,
            reason TEXT NOT NULL,
            message TEXT,
            source TEXT,
            sop_instance_uid TEXT,
            node TEXT,
            time {d.time_type} NOT NULL,
            indexed_at {d.time_type} NOT NULL DEFAULT {d.now}
        )"""
    )
    ix.execute("CREATE INDEX quarantine_reason ON quarantine (reason)")
    ix.execute("CREATE INDEX quarantine_time ON quarantine (time)")


def _v2_aggregates(ix: Index) -> None:
    """Series and study rows kept up to date on every write, and each instance's folder,
    so ``series`` and ``studies`` read a handful of rows instead of grouping millions."""
    d = ix.dialect
    ix.execute("ALTER TABLE instances ADD COLUMN folder TEXT")
    rows = ix.execute("SELECT id, path FROM instances").fetchall()
    ix.executemany(
        "UPDATE instances SET folder = ? WHERE id = ?",
        [(posixpath.dirname(path), row_id) for row_id, path in rows],
    )
    ix.execute(
        f"""CREATE TABLE series (
            series_instance_uid TEXT PRIMARY KEY,
            study_instance_uid TEXT,
            patient_id TEXT,
            modality TEXT,
            series_number TEXT,
            instances BIGINT NOT NULL,
            first_arrival {d.time_type},
            last_arrival {d.time_type},
            folder TEXT
        )"""
    )
    ix.execute("CREATE INDEX series_study ON series (study_instance_uid)")
    ix.execute("CREATE INDEX series_patient ON series (patient_id)")
    ix.execute(
        f"""CREATE TABLE studies (
            study_instance_uid TEXT PRIMARY KEY,
            patient_id TEXT,
            study_date TEXT,
            series BIGINT NOT NULL,
            instances BIGINT NOT NULL,
            first_arrival {d.time_type},
            last_arrival {d.time_type},
            folder TEXT
        )"""
    )
    ix.execute("CREATE INDEX studies_patient ON studies (patient_id)")
    ix.refresh_all()


MIGRATIONS: tuple[Migration, ...] = (_v1_tables, _v2_aggregates)
"""``MIGRATIONS[n]`` takes an index from schema version n to n + 1."""
SCHEMA_VERSION = len(MIGRATIONS)


# ----------------------------------------------------------------------------- the index


class Index:
    """One connection to the index; the daemon's parent holds the only writer."""

    def __init__(self, conn: Any, dialect: _Dialect, where: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.where = where
        self._depth = 0

    # ----- low level ---------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        d = self.dialect
        return self.conn.execute(d.sql(sql), [d.value(p) for p in params])

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        d = self.dialect
        batch = [[d.value(p) for p in row] for row in rows]
        if not batch:
            return
        if d.name == "sqlite":
            self.conn.executemany(sql, batch)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(d.sql(sql), batch)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; a nested one is part of the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self._outer_transaction():
                yield
        finally:
            self._depth = 0

    @contextlib.contextmanager
    def _outer_transaction(self) -> Iterator[None]:
        if self.dialect.name == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        else:
            with self.conn.transaction():
                yield

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- schema --------------------------------------------------------------------

    def schema_version(self) -> int:
        try:
            row = self.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except Exception:  # noqa: BLE001 - no meta table: a new, empty index
            if self.dialect.name != "sqlite":
                self.conn.rollback()
            return 0
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        """Run the migrations this index has not had yet, one transaction each."""
        with self.transaction():
            if self.dialect.name == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", [0x44574958])
            self.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise IndexError_(
                f"index {self.where} has schema version {version}, newer than this "
                f"dicomwatch knows ({SCHEMA_VERSION}); upgrade dicomwatch or rebuild the index"
            )
        while version < SCHEMA_VERSION:
            with self.transaction():
                if self.dialect.name == "postgresql":
                    self.execute("SELECT pg_advisory_xact_lock(?)", [0x44574958])
                if self.schema_version() != version:  # another process migrated it
                    version = self.schema_version()
                    continue
                MIGRATIONS[version](self)
                version += 1
                self.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [str(version)],
                )
                if self.dialect.name == "sqlite":
                    self.conn.execute(f"PRAGMA user_version = {int(version)}")
            log.info("index %s migrated to schema version %d", self.where, version)

    # ----- writing -------------------------------------------------------------------

    def write(
        self, instances: Sequence[InstanceRow], quarantined: Sequence[QuarantineRow] = ()
    ) -> None:
        """Add rows (a row already there, same UID and path, is kept); one transaction."""
        with self.transaction():
            self._insert_instances(instances)
            self._insert_quarantined(quarantined)
            self.refresh(
                {r.series_instance_uid for r in instances if r.series_instance_uid},
                {r.study_instance_uid for r in instances if r.study_instance_uid},
            )

    def _insert_instances(self, rows: Sequence[InstanceRow]) -> None:
        d = self.dialect
        columns = (*INSTANCE_COLUMNS, "folder")
        marks = ", ".join("?" for _ in INSTANCE_COLUMNS)
        self.executemany(
            f"INSERT INTO instances ({', '.join(columns)}) "  # noqa: S608 - constant names; values bound
            f"VALUES ({marks.removesuffix(', ?')}, COALESCE(?, {d.now}), ?) "
            # The same file again is one row.  Two workers can report one file's two
            # arrivals in either order: the row says what the first filing did.
            "ON CONFLICT (sop_instance_uid, path) DO UPDATE SET outcome = excluded.outcome, "
            "source = excluded.source, time = excluded.time, node = excluded.node "
            "WHERE instances.outcome = 'duplicate' AND excluded.outcome <> 'duplicate'",
            [
                (*(getattr(r, c) for c in INSTANCE_COLUMNS[:-1]), d.time_in(r.time), r.folder)
                for r in rows
            ],
        )

    def _insert_quarantined(self, rows: Sequence[QuarantineRow]) -> None:
        d = self.dialect
        marks = ", ".join("?" for _ in QUARANTINE_COLUMNS[:-1])
        self.executemany(
            f"INSERT INTO quarantine ({', '.join(QUARANTINE_COLUMNS)}) "  # noqa: S608 - constant names; values bound
            f"VALUES ({marks}, COALESCE(?, {d.now})) ON CONFLICT (path) DO NOTHING",
            [(*(getattr(r, c) for c in QUARANTINE_COLUMNS[:-1]), d.time_in(r.time)) for r in rows],
        )

    def refresh(self, series: Iterable[str], studies: Iterable[str]) -> None:
        """Recompute the series and study rows of these UIDs from their instances."""
        series_list = sorted(series)
        for start in range(0, len(series_list), CHUNK):
            self._refresh_series(series_list[start : start + CHUNK])
        study_list = sorted(studies)
        for start in range(0, len(study_list), CHUNK):
            self._refresh_studies(study_list[start : start + CHUNK])

    def refresh_all(self) -> None:
        self.execute("DELETE FROM series")
        self.execute("DELETE FROM studies")
        self._refresh_series(None)
        self._refresh_studies(None)

    def _refresh_series(self, uids: list[str] | None) -> None:
        where, params = _in_list("series_instance_uid", uids)
        self.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, patient_id, "  # noqa: S608 - constant names; values bound
            "modality, series_number, instances, first_arrival, last_arrival, folder) "
            "SELECT series_instance_uid, MIN(study_instance_uid), MIN(patient_id), "
            "MIN(modality), MIN(series_number), COUNT(DISTINCT sop_instance_uid), "
            "MIN(time), MAX(time), MIN(folder) FROM instances "
            f"WHERE series_instance_uid IS NOT NULL{where} GROUP BY series_instance_uid "
            "ON CONFLICT (series_instance_uid) DO UPDATE SET "
            "study_instance_uid = excluded.study_instance_uid, "
            "patient_id = excluded.patient_id, modality = excluded.modality, "
            "series_number = excluded.series_number, instances = excluded.instances, "
            "first_arrival = excluded.first_arrival, last_arrival = excluded.last_arrival, "
            "folder = excluded.folder",
            params,
        )

    def _refresh_studies(self, uids: list[str] | None) -> None:
        where, params = _in_list("study_instance_uid", uids)
        self.execute(
            "INSERT INTO studies (study_instance_uid, patient_id, study_date, series, "  # noqa: S608 - constant names; values bound
            "instances, first_arrival, last_arrival) "
            "SELECT study_instance_uid, MIN(patient_id), MIN(study_date), "
            "COUNT(DISTINCT series_instance_uid), COUNT(DISTINCT sop_instance_uid), "
            "MIN(time), MAX(time) FROM instances "
            f"WHERE study_instance_uid IS NOT NULL{where} GROUP BY study_instance_uid "
            "ON CONFLICT (study_instance_uid) DO UPDATE SET "
            "patient_id = excluded.patient_id, study_date = excluded.study_date, "
            "series = excluded.series, instances = excluded.instances, "
            "first_arrival = excluded.first_arrival, last_arrival = excluded.last_arrival",
            params,
        )
        # A study's folder: what its series folders have in common.
        folders: dict[str, list[str]] = {}
        for study, folder in self.execute(
            "SELECT study_instance_uid, folder FROM series "  # noqa: S608 - constant names; values bound
            f"WHERE study_instance_uid IS NOT NULL AND folder IS NOT NULL{where}",
            params,
        ).fetchall():
            folders.setdefault(study, []).append(folder)
        self.executemany(
            "UPDATE studies SET folder = ? WHERE study_instance_uid = ?",
            [(_common_folder(f), study) for study, f in folders.items()],
        )

    def delete_instances(self, keys: Iterable[tuple[str, str]]) -> None:
        """Drop rows by (SOP Instance UID, path) and recompute what they counted in."""
        keys = list(keys)
        if not keys:
            return
        series: set[str] = set()
        studies: set[str] = set()
        for uid, path in keys:
            for se, st in self.execute(
                "SELECT series_instance_uid, study_instance_uid FROM instances "
                "WHERE sop_instance_uid = ? AND path = ?",
                [uid, path],
            ).fetchall():
                series.add(se)
                studies.add(st)
        self.executemany("DELETE FROM instances WHERE sop_instance_uid = ? AND path = ?", keys)
        self.executemany(
            "DELETE FROM series WHERE series_instance_uid = ?", [(s,) for s in series if s]
        )
        self.executemany(
            "DELETE FROM studies WHERE study_instance_uid = ?", [(s,) for s in studies if s]
        )
        self.refresh({s for s in series if s}, {s for s in studies if s})

    def delete_quarantined(self, paths: Iterable[str]) -> None:
        self.executemany("DELETE FROM quarantine WHERE path = ?", [(p,) for p in paths])

    # ----- reading -------------------------------------------------------------------

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.execute(sql, params)
        names = [c[0] for c in cur.description]
        rows = []
        for values in cur.fetchall():
            row = dict(zip(names, values, strict=True))
            for key in ("time", "first_arrival", "last_arrival", "indexed_at"):
                if key in row:
                    row[key] = self.dialect.time_out(row[key])
            rows.append(row)
        return rows

    def instance_rows(self) -> list[InstanceRow]:
        """Every instance row as written (for check, rebuild and tests)."""
        return [
            InstanceRow(**{k: row[k] for k in INSTANCE_COLUMNS})
            for row in self.select(f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances")  # noqa: S608 - constant names; values bound
        ]

    def quarantine_rows(self) -> list[QuarantineRow]:
        return [
            QuarantineRow(**{k: row[k] for k in QUARANTINE_COLUMNS})
            for row in self.select(f"SELECT {', '.join(QUARANTINE_COLUMNS)} FROM quarantine")  # noqa: S608 - constant names; values bound
        ]


def _in_list(column: str, values: list[str] | None) -> tuple[str, list[str]]:
    if values is None:
        return "", []
    if not values:
        return " AND 1 = 0", []
    return f" AND {column} IN ({', '.join('?' for _ in values)})", list(values)


def _common_folder(folders: list[str]) -> str:
    try:
        return posixpath.commonpath(folders)
    except ValueError:  # absolute and relative mixed: cannot happen for our rows
        return ""


def row_dict(row: InstanceRow | QuarantineRow) -> dict[str, Any]:
    return asdict(row)


# ----------------------------------------------------------------------------- opening


def sqlite_path(cfg: Config) -> Path:
    return cfg.state_dir / SQLITE_NAME


def check_location(cfg: Config) -> None:
    """Refuse (``ConfigError``) to keep the SQLite index on a network filesystem."""
    if cfg.index != "sqlite":
        return
    folder = cfg.state_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        magic = filesystem_magic(folder)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot check {cfg.state_dir}: {exc.strerror}") from exc
    kind = network_filesystem(magic) if magic is not None else None
    if kind is not None:
        raise ConfigError(
            f"state_dir: {cfg.state_dir} is on {kind}; the SQLite index needs a local "
            "disk (its locking is not safe over a network filesystem). Set state_dir to "
            "a local folder, or use 'index: postgresql://...' for a shared index "
            "(or 'index: none')"
        )


def open_index(cfg: Config, *, create: bool = True) -> Index:
    """Connect to the configured index and bring its schema up to date.

    ``create=False`` (the read-only commands) refuses to make a new SQLite file.
    Raises ``IndexMissing``/``IndexError_`` when it cannot be used now.
    """
    if cfg.index == "none":
        raise IndexError_("the index is turned off (index: none)")
    if cfg.index == "sqlite":
        index = _open_sqlite(sqlite_path(cfg), create=create)
    else:
        index = _open_postgres(cfg.index)
    try:
        index.migrate()
    except IndexError_:
        index.close()
        raise
    except Exception as exc:
        index.close()
        raise IndexError_(f"index {index.where}: {exc}") from exc
    return index


def _open_sqlite(path: Path, *, create: bool) -> Index:
    if not create and not path.exists():
        raise IndexMissing(
            f"no index at {path} yet: it is written by 'dicomwatch run' and 'dicomwatch "
            "sort', or made from the archive by 'dicomwatch index rebuild'"
        )
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            os.fspath(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL survives a killed process; a power cut may lose the last
        # transactions, which a rebuild restores (the index is derived).
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA case_sensitive_like = ON")
    except (sqlite3.Error, OSError) as exc:
        raise IndexError_(f"cannot open index {path}: {exc}") from exc
    return Index(conn, _Dialect(), str(path))


def _open_postgres(url: str) -> Index:
    try:
        import psycopg
    except ImportError as exc:
        raise IndexError_(
            "index: a PostgreSQL index needs psycopg: pip install 'dicomwatch[postgresql]'"
        ) from exc
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise IndexError_(f"cannot connect to the PostgreSQL index: {exc}") from exc
    return Index(conn, _PostgresDialect(), _redact(url))


def _redact(url: str) -> str:
    """The URL without a password, for log lines."""
    head, sep, tail = url.partition("@")
    if sep and ":" in head.split("//", 1)[-1]:
        scheme, _, user = head.partition("//")
        return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"
    return url
