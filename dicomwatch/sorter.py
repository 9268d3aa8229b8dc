"""The sorting engine: one file in, one ``Result`` out.

``plan`` decides (pure: header values in, relative path out); ``process`` acts: it
reads the file once, checks it, decodes it if asked, files it durably and, only then,
removes the source when the caller wants the file moved.  Both ``dicomwatch sort`` and
``dicomwatch run`` call ``process`` in worker processes; neither has its own filing code.

Every exception is turned into an outcome here: a ``RejectedError`` quarantines the
file with its reason, an ``OSError`` or ``RetryableError`` leaves it where it is and
says so.  Nothing that cannot be filed is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from dicomwatch import decode, dicomio
from dicomwatch.archive import Data, Filer, Placement
from dicomwatch.errors import RejectedError, RetryableError
from dicomwatch.layout import (
    Template,
    clean_filename_field,
    compile_template,
    ensure_inside,
    render,
)
from dicomwatch.reasons import Reason
from dicomwatch.result import Instance, Outcome, Result
from dicomwatch.sidecar import SIDECAR_SUFFIX, QuarantineRecord

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class EngineSettings:
    """What a worker needs to file a file: small, picklable, sent with every task."""

    archive: Path
    quarantine: Path
    archive_staging: Path
    quarantine_staging: Path
    template_text: str
    decompress: bool = True
    max_decoded_bytes: int = 4 * 1024**3
    fsync: bool = True
    node_id: str = ""
    processed: Path | None = None
    processed_staging: Path | None = None
    template: Template = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "template", compile_template(self.template_text))


@dataclass(frozen=True)
class Task:
    """One file to process.  ``path`` is read; ``source`` is what the log calls it."""

    path: str
    source: str
    remove_source: bool = False
    rel_source: str | None = None
    """Path relative to the inbox, for ``after_filing: move`` and quarantine names."""
    quarantine_reason: tuple[Reason, str] | None = None
    """Set by the daemon when workers kept dying on this file: quarantine it unread."""
    dry_run: bool = False
    attempts: int = 0


@dataclass(frozen=True)
class FilingPlan:
    rel_path: PurePosixPath
    sop_instance_uid: str


def plan(values: dict[str, str | None], template: Template, sop_instance_uid: str) -> FilingPlan:
    """Where an instance goes, from its header values alone."""
    return FilingPlan(render(template, values, sop_instance_uid), sop_instance_uid)


class _Filers:
    """Per-process cache of ``Filer`` objects so their folder caches survive across tasks."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, Path, bool], Filer] = {}

    def get(self, root: Path, staging: Path, fsync: bool) -> Filer:
        key = (root, staging, fsync)
        filer = self._cache.get(key)
        if filer is None:
            if len(self._cache) > 16:
                self._cache.clear()
            filer = self._cache[key] = Filer(root, staging, fsync=fsync)
        return filer


_FILERS = _Filers()


def _existing_uid(path: Path) -> str | None:
    """SOPInstanceUID of an archived file; only read when a name is already taken."""
    try:
        return str(dicomio.parse(path.read_bytes()).SOPInstanceUID)
    except (OSError, RejectedError):
        return None


_IDENTITY_KEYWORDS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Modality",
    "StudyDate",
    "SeriesNumber",
    "InstanceNumber",
)


@dataclass(frozen=True)
class _Prepared:
    out: Data
    filing: FilingPlan
    ts_in: str
    ts_out: str
    instance: Instance


def _identify(values: dict[str, str | None], template_keywords: frozenset[str]) -> Instance:
    """The identifiers the parent's sinks need, read in the same pass as the template's."""
    return Instance(
        series_instance_uid=values.get("SeriesInstanceUID"),
        study_instance_uid=values.get("StudyInstanceUID"),
        patient_id=values.get("PatientID"),
        modality=values.get("Modality"),
        study_date=values.get("StudyDate"),
        series_number=values.get("SeriesNumber"),
        instance_number=values.get("InstanceNumber"),
        template_values={k: values.get(k) for k in sorted(template_keywords)},
    )


def _prepare(data: bytes, settings: EngineSettings) -> _Prepared:
    """Read once, check, decide the path, decode if configured."""
    ds = dicomio.parse(data, max_inflated_bytes=settings.max_decoded_bytes)
    dicomio.check_complete(ds)
    ts_in = dicomio.transfer_syntax(ds)
    uid = str(ds.SOPInstanceUID)
    keywords = settings.template.keywords
    instance = _identify(dicomio.header_values(ds, keywords.union(_IDENTITY_KEYWORDS)), keywords)
    filing = plan(dict(instance.template_values), settings.template, uid)
    if not settings.decompress:
        return _Prepared(data, filing, ts_in, ts_in, instance)
    if decode.is_compressed(ds):
        decode.check_size(ds, settings.max_decoded_bytes)
        out = decode.decompress_encoded(ds)
        return _Prepared(out, filing, ts_in, EXPLICIT_VR_LITTLE_ENDIAN, instance)
    if dicomio.is_plain_explicit_le(ds):
        return _Prepared(data, filing, ts_in, ts_in, instance)
    return _Prepared(dicomio.encode(ds), filing, ts_in, EXPLICIT_VR_LITTLE_ENDIAN, instance)


_ERRNO_REASONS = {
    errno.ENOSPC: Reason.DISK_FULL,
    errno.EDQUOT: Reason.QUOTA_EXCEEDED,
    errno.EACCES: Reason.PERMISSION_DENIED,
    errno.EPERM: Reason.PERMISSION_DENIED,
    errno.EROFS: Reason.READ_ONLY,
    errno.ENOENT: Reason.VANISHED,
}


def retry_reason(exc: OSError) -> Reason:
    """The reason code for an ``OSError`` that leaves a file to be tried again."""
    return _ERRNO_REASONS.get(exc.errno or 0, Reason.IO_ERROR)


_QUARANTINE_NAME_BYTES = 200
"""Longest quarantine name: a collision number (``~9999``) and the ``.reason.json``
sidecar suffix must still fit in the 255 bytes a file name may have."""


def _quarantine_name(task: Task) -> str:
    """The source's inbox-relative path as one file name.  A deep or long path would not
    fit in a name, and a quarantine that fails with ENAMETOOLONG is retried forever, so a
    long name is cut and keeps a hash of the whole, which keeps distinct names distinct.
    Leading dots are dropped: a quarantined file must not be hidden from ``ls`` (files the
    receiver wrote come from ``.dicomwatch-received/``)."""
    base = task.rel_source or os.path.basename(task.source) or "unnamed"
    name = clean_filename_field(base.replace("/", "_")).lstrip(".") or "unnamed"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= _QUARANTINE_NAME_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    head = encoded[: _QUARANTINE_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def quarantine(
    task: Task,
    data: bytes,
    settings: EngineSettings,
    reason: Reason,
    message: str,
    uid: str | None = None,
) -> Placement:
    """File the original bytes under ``quarantine/<reason>/`` with a ``.reason.json`` sidecar.

    The sidecar is written after the file, and only if absent, so re-quarantining after a
    crash finds the identical file (a duplicate) and completes the missing sidecar.
    """
    filer = _FILERS.get(settings.quarantine, settings.quarantine_staging, settings.fsync)
    rel = PurePosixPath(clean_filename_field(reason)) / _quarantine_name(task)
    placement = filer.place(rel, data)
    record = QuarantineRecord(
        reason=str(reason),
        error=message,
        source=task.source,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        sop_instance_uid=uid,
        node=settings.node_id,
        attempts=task.attempts,
    )
    side_rel = placement.path.relative_to(settings.quarantine).with_name(
        placement.path.name + SIDECAR_SUFFIX
    )
    filer.write_once(PurePosixPath(side_rel.as_posix()), record.to_bytes())
    return placement


def _keep_processed(task: Task, data: bytes, settings: EngineSettings) -> None:
    """``after_filing: move``: a durable copy of the original under ``processed/``."""
    if settings.processed is None or settings.processed_staging is None or not task.rel_source:
        return
    filer = _FILERS.get(settings.processed, settings.processed_staging, settings.fsync)
    rel = PurePosixPath(*(clean_filename_field(p) for p in PurePosixPath(task.rel_source).parts))
    filer.place(rel, data)


def _remove_source(task: Task) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(task.path)


def process(task: Task, settings: EngineSettings) -> Result:
    """File one file; never raises for anything the file or the disk can do."""
    started = time.perf_counter()

    instance: Instance | None = None

    def done(outcome: Outcome, **kw: object) -> Result:
        ms = (time.perf_counter() - started) * 1000.0
        return Result(
            outcome=outcome,
            source=task.source,
            ms=ms,
            instance=instance,
            **kw,  # type: ignore[arg-type]
        )

    try:
        data, read_id = _read_regular(task.path)
    except OSError as exc:
        return done(
            Outcome.FAILED, reason=retry_reason(exc), message=_oserror_text(exc), retryable=True
        )

    uid: str | None = None
    ts_in: str | None = None
    try:
        if task.quarantine_reason is not None:
            reason, message = task.quarantine_reason
            raise _ForcedQuarantine(reason, message)
        prepared = _prepare(data, settings)
        out, filing, ts_in, ts_out = prepared.out, prepared.filing, prepared.ts_in, prepared.ts_out
        instance = prepared.instance
        uid = filing.sop_instance_uid
        if task.dry_run:
            dest = ensure_inside(settings.archive, filing.rel_path)
            return done(
                Outcome.SORTED,
                destination=str(dest),
                sop_instance_uid=uid,
                ts_in=ts_in,
                ts_out=ts_out,
                bytes=len(data),
                message="dry-run",
            )
        filer = _FILERS.get(settings.archive, settings.archive_staging, settings.fsync)
        placed = filer.place(filing.rel_path, out, uid=uid, uid_of=_existing_uid)
        digest = hashlib.sha256(out).hexdigest()
        del out
        if placed.duplicate:
            outcome = Outcome.DUPLICATE
        elif placed.same_uid_differs:
            outcome = Outcome.CONFLICT
        else:
            outcome = Outcome.SORTED
        result = done(
            outcome,
            destination=str(placed.path),
            sop_instance_uid=uid,
            ts_in=ts_in,
            ts_out=ts_out,
            bytes=len(data),
            reason=Reason.SAME_UID_DIFFERENT_CONTENT
            if outcome is Outcome.CONFLICT
            else (Reason.NAME_TAKEN if placed.renamed and not placed.duplicate else None),
            sha256=digest,
        )
    except (RejectedError, _ForcedQuarantine) as exc:
        reason = exc.reason
        if task.dry_run:
            return done(
                Outcome.QUARANTINED,
                sop_instance_uid=uid,
                ts_in=ts_in,
                bytes=len(data),
                reason=reason,
                message=str(exc),
            )
        try:
            placed = quarantine(task, data, settings, reason, str(exc), uid)
        except OSError as qexc:
            return done(
                Outcome.FAILED,
                reason=retry_reason(qexc),
                message=f"cannot quarantine ({exc}): {_oserror_text(qexc)}",
                retryable=True,
            )
        except RejectedError as qexc:  # every quarantine name for it is taken
            return done(
                Outcome.FAILED,
                reason=qexc.reason,
                message=f"cannot quarantine ({exc}): {qexc}",
                retryable=True,
            )
        result = done(
            Outcome.QUARANTINED,
            destination=str(placed.path),
            sop_instance_uid=uid,
            ts_in=ts_in,
            bytes=len(data),
            reason=reason,
            message=str(exc),
        )
    except MemoryError:
        return done(
            Outcome.FAILED,
            reason=Reason.OUT_OF_MEMORY,
            sop_instance_uid=uid,
            ts_in=ts_in,
            bytes=len(data),
            message="worker memory ceiling reached",
            retryable=True,
        )
    except RetryableError as exc:
        return done(Outcome.FAILED, reason=Reason.RETRY, message=str(exc), retryable=True)
    except OSError as exc:
        return done(
            Outcome.FAILED,
            reason=retry_reason(exc),
            sop_instance_uid=uid,
            ts_in=ts_in,
            bytes=len(data),
            message=_oserror_text(exc),
            retryable=True,
        )

    if task.remove_source:
        if placed.duplicate and placed.file_id == read_id.file_id:
            # The "archived copy" is the source itself, reached by another path (the
            # archive through a symlink or a bind mount): removing it would lose it.
            return done(
                Outcome.FAILED,
                reason=Reason.SOURCE_IS_FILED_COPY,
                destination=result.destination,
                sop_instance_uid=uid,
                bytes=len(data),
                message="the source is the filed file itself (the archive or quarantine "
                "under another path); not removed",
            )
        try:
            changed = _changed_since_read(task.path, read_id)
        except OSError as exc:
            return done(
                Outcome.FAILED,
                reason=retry_reason(exc),
                destination=result.destination,
                sop_instance_uid=uid,
                message=f"filed, but cannot check the source: {_oserror_text(exc)}",
                retryable=True,
            )
        if changed is not None:
            # Someone wrote to the file after we read it (a sender that paused longer
            # than settle_seconds): what was filed may be partial.  The source stays and
            # is filed again later, as a conflict beside the partial copy, never lost.
            return done(
                Outcome.FAILED,
                reason=Reason.CHANGED_WHILE_FILING,
                destination=result.destination,
                sop_instance_uid=uid,
                bytes=len(data),
                message=f"the source changed while it was filed ({changed}); not removed",
                retryable=True,
            )
        try:
            _keep_processed(task, data, settings)
            _remove_source(task)
        except OSError as exc:
            # Filed durably, but the source stays: the next attempt finds a duplicate.
            return done(
                Outcome.FAILED,
                reason=retry_reason(exc),
                destination=result.destination,
                sop_instance_uid=uid,
                message=f"filed, but cannot remove source: {_oserror_text(exc)}",
                retryable=True,
            )
    return result


class _ForcedQuarantine(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _oserror_text(exc: OSError) -> str:
    return f"{exc.strerror or exc.__class__.__name__}" + (
        f": {exc.filename}" if exc.filename else ""
    )


@dataclass(frozen=True)
class _ReadId:
    """Which file was read, and its size and mtime when the read started."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def file_id(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @classmethod
    def of(cls, st: os.stat_result) -> _ReadId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _read_regular(path: str) -> tuple[bytes, _ReadId]:
    """Read a file without following a symlink or blocking on a FIFO that replaced it.

    Returns the bytes and the file's identity, size and mtime taken from the same open
    file before reading, so that a change during or after the read can be told.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 22)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), _ReadId.of(st)
    finally:
        os.close(fd)


def _changed_since_read(path: str, before: _ReadId) -> str | None:
    """How the file at ``path`` differs from the one read (another file now, another
    size or mtime), or None if it is the same, unchanged.  Opened again by path, without
    following a symlink, just before the source is removed."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None  # already gone: nothing left to remove or to lose
    try:
        now = _ReadId.of(os.fstat(fd))
    finally:
        os.close(fd)
    if now.file_id != before.file_id:
        return "replaced by another file"
    if now.size != before.size:
        return f"size {before.size} -> {now.size}"
    if now.mtime_ns != before.mtime_ns:
        return "modification time changed"
    return None
