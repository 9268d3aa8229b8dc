"""The index's result sink: rows buffered per file, one transaction per flush.

Filing never waits for the index.  ``on_result`` only turns a result into a row, appends
it to a small journal file and to the buffer; ``flush`` (from the daemon's one-second
timer, at stop, and every ``AUTOFLUSH_ROWS`` rows) writes the buffer in one transaction.

When the index is unavailable (server down, file locked or corrupt) the error is logged
once, filing goes on, and writing is retried with back-off; the buffer is bounded, and
an overflow is reported with what to do (``dicomwatch index rebuild``).

The journal is what makes a killed parent lose nothing: rows handed to the sink but not
yet committed are in ``state_dir/journal/<owner>.jsonl`` (a plain ``write``, in the
page cache the moment it returns), and the next process to start adopts the journals
whose owners are gone.  Rows are inserted idempotently, so replaying twice is harmless.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dicomwatch.config import Config
from dicomwatch.indexdb import (
    Index,
    IndexError_,
    InstanceRow,
    QuarantineRow,
    now_text,
    open_index,
)
from dicomwatch.result import Outcome, Result
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)

AUTOFLUSH_ROWS = 500
MAX_BUFFER = 100_000
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
CATCH_UP_MARGIN_SECONDS = 60.0
"""Files changed this long before a killed process's last commit are looked at again."""
JOURNAL_DIR = "journal"

_ROW_ERRORS = ("DataError", "IntegrityError", "ProgrammingError", "InterfaceError")
"""DB-API error classes that blame a row, not the connection: written one by one."""


class Journal:
    """An append-only file of rows not yet committed, locked by its owner while it lives."""

    def __init__(self, folder: Path, owner: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Unique even for two sinks in one process, which a POSIX lock cannot tell apart.
        self.path = folder / f"{owner}.{secrets.token_hex(4)}.jsonl"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # A POSIX record lock, not flock(): forked workers do not inherit it, so the
            # journal of a killed parent is free even while its workers linger.
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        self._finalizer = weakref.finalize(self, _release, self.fd, self.path)
        _OWN_JOURNALS.add(self.path)
        self.mark()

    def mark(self) -> None:
        """Note the time: everything filed before it is committed (or in this journal)."""
        os.write(self.fd, (json.dumps({"k": "c", "t": time.time()}) + "\n").encode("ascii"))

    def append(self, kind: str, row: InstanceRow | QuarantineRow) -> None:
        line = json.dumps({"k": kind, **asdict(row)}, ensure_ascii=True) + "\n"
        os.write(self.fd, line.encode("ascii"))

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)
        self.mark()

    def close(self) -> None:
        """Remove the (empty) journal and let go of it."""
        if self._finalizer.alive:
            try:
                rows, qrows, _ = read_journal(self.path)
                if not rows and not qrows:
                    os.unlink(self.path)
            except OSError:
                pass  # gone already (a test's folder removed): nothing to keep
            self._finalizer()


_OWN_JOURNALS: set[Path] = set()
"""Journals of this process's live sinks: never adopted as orphans."""


def _release(fd: int, path: Path) -> None:
    _OWN_JOURNALS.discard(path)
    os.close(fd)


def read_journal(path: Path) -> tuple[list[InstanceRow], list[QuarantineRow], float | None]:
    """The rows in a journal and its last commit mark; a line cut short by a kill is
    skipped."""
    rows: list[InstanceRow] = []
    qrows: list[QuarantineRow] = []
    committed: float | None = None
    with path.open("rb") as fh:
        for line in fh:
            try:
                raw = json.loads(line)
                kind = raw.pop("k")
                if kind == "c":
                    committed = float(raw["t"])
                elif kind == "i":
                    rows.append(InstanceRow(**raw))
                elif kind == "q":
                    qrows.append(QuarantineRow(**raw))
            except (ValueError, TypeError, KeyError):
                continue
    return rows, qrows, committed


def adopt_orphans(folder: Path, own: Path) -> list[tuple[Path, int]]:
    """Journals of processes that are gone: (path, fd holding its lock), never our own."""
    found: list[tuple[Path, int]] = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.jsonl")):
        if path == own or path in _OWN_JOURNALS:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its owner still runs
            continue
        found.append((path, fd))
    return found


class IndexSink:
    """Writes each filed or quarantined file's row to the index, in batches."""

    def __init__(
        self,
        cfg: Config,
        owner: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        opener: Callable[[], Index] | None = None,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self.archive = cfg.archive
        self.quarantine = cfg.quarantine
        self.node = cfg.effective_node_id
        self.clock = clock
        self.max_buffer = max_buffer
        self._open = opener or (lambda: open_index(cfg))
        self._index: Index | None = None
        self.rows: list[InstanceRow] = []
        self.qrows: list[QuarantineRow] = []
        self.dropped = 0
        self.down = False
        self._retry_at = 0.0
        self._delay = RETRY_INITIAL_SECONDS
        self.journal: Journal | None = None
        self.cfg = cfg
        self._catch_up: CatchUp | None = None
        folder = cfg.state_dir / JOURNAL_DIR
        try:
            self.journal = Journal(folder, owner)
            atexit.register(self.close)
            self._adopt(folder)
        except OSError as exc:
            log.warning(
                "index: cannot keep a journal in %s (%s); rows not yet written are lost if "
                "this process is killed ('dicomwatch index rebuild' restores them)",
                folder,
                exc.strerror or exc,
            )

    def _adopt(self, folder: Path) -> None:
        assert self.journal is not None
        since: float | None = None
        for path, fd in adopt_orphans(folder, self.journal.path):
            try:
                rows, qrows, committed = read_journal(path)
                mark = committed if committed is not None else path.stat().st_mtime
                since = mark if since is None else min(since, mark)
                for row in rows:
                    self._keep("i", row)
                for qrow in qrows:
                    self._keep("q", qrow)
                os.unlink(path)  # its rows are in our journal now
                if rows or qrows:
                    log.info(
                        "index: %d rows left by a process that stopped before writing "
                        "them (%s) are written now",
                        len(rows) + len(qrows),
                        path.name,
                    )
            finally:
                os.close(fd)
        if since is not None:
            self._catch_up = CatchUp(self.cfg, since - CATCH_UP_MARGIN_SECONDS)
            self._catch_up.start()

    # ----- the sink ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.rows) + len(self.qrows)

    def on_result(self, task: Task, result: Result) -> None:
        if result.destination is None:
            return
        if result.outcome in (Outcome.SORTED, Outcome.DUPLICATE, Outcome.CONFLICT):
            if result.sop_instance_uid is None:
                return
            self._keep("i", self.instance_row(result))
        elif result.outcome is Outcome.QUARANTINED:
            self._keep("q", self.quarantine_row(result))
        else:
            return
        if self.pending >= AUTOFLUSH_ROWS:
            self.flush()

    def _keep(self, kind: str, row: InstanceRow | QuarantineRow) -> None:
        if self.pending >= self.max_buffer:
            self.dropped += 1
            if self.dropped == 1:
                log.error(
                    "index: %d rows are waiting for the index, the most kept; rows for "
                    "further files are not kept. Files are still filed; once the index "
                    "is back, run 'dicomwatch index rebuild' to add them",
                    self.max_buffer,
                )
            return
        if isinstance(row, InstanceRow):
            self.rows.append(row)
        else:
            self.qrows.append(row)
        if self.journal is not None:
            try:
                self.journal.append(kind, row)
            except OSError as exc:
                log.warning("index: cannot write the journal: %s", exc.strerror or exc)

    def instance_row(self, result: Result) -> InstanceRow:
        assert result.destination is not None and result.sop_instance_uid is not None
        inst = result.instance
        try:
            size: int | None = os.stat(result.destination).st_size
        except OSError:
            size = None
        return InstanceRow(
            sop_instance_uid=result.sop_instance_uid,
            path=Path(os.path.relpath(result.destination, self.archive)).as_posix(),
            series_instance_uid=inst.series_instance_uid if inst else None,
            study_instance_uid=inst.study_instance_uid if inst else None,
            patient_id=inst.patient_id if inst else None,
            modality=inst.modality if inst else None,
            study_date=inst.study_date if inst else None,
            series_number=inst.series_number if inst else None,
            instance_number=inst.instance_number if inst else None,
            size=size,
            sha256=result.sha256,
            transfer_syntax=result.ts_in,
            source=result.source,
            outcome=result.outcome.value,
            node=self.node,
            time=now_text(),
        )

    def quarantine_row(self, result: Result) -> QuarantineRow:
        assert result.destination is not None
        return QuarantineRow(
            path=Path(os.path.relpath(result.destination, self.quarantine)).as_posix(),
            reason=str(result.reason) if result.reason else "rejected",
            message=result.message,
            source=result.source,
            sop_instance_uid=result.sop_instance_uid,
            node=self.node,
            time=now_text(),
        )

    def flush(self) -> None:
        """Write what is buffered in one transaction; on failure keep it and back off."""
        if self._catch_up is not None:
            self._take_caught_up(self._catch_up)
        if not self.pending or self.clock() < self._retry_at:
            return
        try:
            if self._index is None:
                self._index = self._open()
            try:
                self._index.write(self.rows, self.qrows)
            except Exception as exc:
                if type(exc).__name__ not in _ROW_ERRORS:
                    raise
                self._write_one_by_one(self._index, exc)
        except Exception as exc:  # noqa: BLE001 - any engine failure: keep filing
            self._failed(exc)
            return
        written = self.pending
        self.rows.clear()
        self.qrows.clear()
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.clear()
        if self.down:
            log.info("index is available again; wrote %d rows that waited for it", written)
            self.down = False
        if self.dropped:
            log.error(
                "index: rows for %d files were not kept while it was unavailable; run "
                "'dicomwatch index rebuild' to add them",
                self.dropped,
            )
            self.dropped = 0
        self._delay = RETRY_INITIAL_SECONDS

    def _take_caught_up(self, catch_up: CatchUp) -> None:
        while True:
            try:
                kind, row = catch_up.found.get_nowait()
            except queue.Empty:
                break
            self._keep(kind, row)
        if catch_up.done.is_set() and catch_up.found.empty():
            self._catch_up = None

    def _write_one_by_one(self, index: Index, first: Exception) -> None:
        """A row the engine refuses must not hold back every other one."""
        for row in self.rows:
            try:
                index.write([row])
            except Exception as exc:
                if type(exc).__name__ not in _ROW_ERRORS:
                    raise
                log.error("index: row for %s refused (%s); left out", row.path, exc)
        for qrow in self.qrows:
            try:
                index.write([], [qrow])
            except Exception as exc:
                if type(exc).__name__ not in _ROW_ERRORS:
                    raise
                log.error("index: row for %s refused (%s); left out", qrow.path, exc)

    def _failed(self, exc: Exception) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not self.down:
            log.error(
                "index unavailable: %s. Filing goes on; %d rows wait (at most %d) and are "
                "written when it is back; retrying every %.0f s at most. If it stays so, "
                "check it or move it aside and run 'dicomwatch index rebuild'",
                text,
                self.pending,
                self.max_buffer,
                RETRY_MAX_SECONDS,
            )
            self.down = True
        else:
            log.debug("index still unavailable: %s", text)
        self._retry_at = self.clock() + self._delay
        self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)

    def close(self) -> None:
        """Flush once more (ignoring back-off) and let go of the index and the journal.

        Also run at a normal interpreter exit: a journal that is gone says the process
        stopped cleanly, so the next start has nothing to catch up on.
        """
        if self.journal is not None and not self.journal.alive:
            return
        self._retry_at = 0.0
        try:
            self.flush()
            if self._index is not None:
                self._index.close()
                self._index = None
            if self.journal is not None and not self.pending:
                self.journal.close()
        except OSError as exc:  # pragma: no cover - the state folder went away
            log.debug("index: cannot close the journal: %s", exc.strerror or exc)


class CatchUp(threading.Thread):
    """After an unclean stop: rows for files filed since the last commit that no journal
    holds (a worker filed the file and removed its claim, then the parent was killed
    before it heard back).  Only files changed since then are read; filing goes on."""

    def __init__(self, cfg: Config, since: float) -> None:
        super().__init__(name="index-catch-up", daemon=True)
        self.cfg = cfg
        self.since = since
        self.found: queue.SimpleQueue[tuple[str, InstanceRow | QuarantineRow]] = queue.SimpleQueue()
        self.done = threading.Event()

    def run(self) -> None:
        from dicomwatch import rebuild

        count = 0
        try:
            for rel in rebuild.archive_files(self.cfg):
                if self._recent(self.cfg.archive / rel):
                    row = rebuild.instance_row(self.cfg, rel)
                    if row is not None:
                        self.found.put(("i", row))
                        count += 1
            for rel in rebuild.quarantine_files(self.cfg):
                if self._recent(self.cfg.quarantine / rel):
                    self.found.put(("q", rebuild.quarantine_row(self.cfg, rel)))
                    count += 1
        except OSError as exc:
            log.warning("index: catching up after an unclean stop failed: %s", exc)
        finally:
            self.done.set()
        log.info("index: looked again at %d files filed around the last unclean stop", count)

    def _recent(self, path: Path) -> bool:
        try:
            return path.lstat().st_mtime >= self.since
        except OSError:
            return False


def index_sinks(cfg: Config, owner: str, *, enabled: bool = True) -> list[IndexSink]:
    """The index sink for ``run`` and ``sort``, or none (``index: none``, a dry run)."""
    if cfg.index == "none" or not enabled:
        return []
    return [IndexSink(cfg, owner)]


__all__ = ["IndexError_", "IndexSink", "index_sinks"]
