"""Rows from the files themselves: ``index rebuild``, ``index check`` and ``quarantine list``
without an index.

The archive and the quarantine are the truth the index is derived from.  An archived
file gives its row from its header (read up to the pixel data, never decoded) and a
hash of its bytes; a quarantined file gives its row from its ``.reason.json`` sidecar.
The rows are the ones a live run writes, except what only the live run saw: the source
name and the arrival time (a rebuild keeps both from an existing row, else the time is
the file's modification time and the source is unknown) and the source transfer syntax
of a file that was decompressed (a rebuild sees the archived one).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from dicomwatch.config import INTERNAL_DIR, Config
from dicomwatch.indexdb import Index, InstanceRow, QuarantineRow, utc_text
from dicomwatch.sidecar import SIDECAR_SUFFIX, QuarantineRecord

log = logging.getLogger(__name__)

PARALLEL_FROM = 1000
"""Archives smaller than this are read in this process; larger ones by a pool."""
CHUNK_FILES = 256

_KEYWORDS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Modality",
    "StudyDate",
    "SeriesNumber",
    "InstanceNumber",
)


def walk(root: Path) -> Iterator[str]:
    """Paths (relative, with ``/``) of the regular files below ``root``, in order; never
    follows links or enters dicomwatch's own folder."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != INTERNAL_DIR)
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                if not stat.S_ISREG(os.lstat(full).st_mode):
                    continue
            except FileNotFoundError:
                continue
            yield name if rel_dir == "." else Path(rel_dir, name).as_posix()


def archive_files(cfg: Config) -> Iterator[str]:
    return walk(cfg.archive)


def quarantine_files(cfg: Config) -> Iterator[str]:
    """Quarantined files, without their sidecars."""
    for rel in walk(cfg.quarantine):
        if not rel.endswith(SIDECAR_SUFFIX):
            yield rel


def _mtime(path: Path) -> str:
    return utc_text(datetime.fromtimestamp(path.stat().st_mtime, UTC))


def instance_row(cfg: Config, rel: str) -> InstanceRow | None:
    """The row of one archived file, from its header and bytes; None if it is no DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicomwatch import dicomio

    path = cfg.archive / rel
    data = path.read_bytes()
    try:
        with dicomio.suppress_pydicom_warnings():
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as exc:
        log.warning("%s: not a DICOM instance (%s); not indexed", path, exc)
        return None
    values = dicomio.header_values(ds, _KEYWORDS)
    return InstanceRow(
        sop_instance_uid=uid,
        path=rel,
        series_instance_uid=values["SeriesInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        patient_id=values["PatientID"],
        modality=values["Modality"],
        study_date=values["StudyDate"],
        series_number=values["SeriesNumber"],
        instance_number=values["InstanceNumber"],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        transfer_syntax=ts,
        source=None,
        outcome="sorted",
        node=cfg.effective_node_id,
        time=_mtime(path),
    )


def quarantine_row(cfg: Config, rel: str) -> QuarantineRow:
    """The row of one quarantined file, from its sidecar (or its folder, without one)."""
    path = cfg.quarantine / rel
    try:
        record: QuarantineRecord | None = QuarantineRecord.from_bytes(
            path.with_name(path.name + SIDECAR_SUFFIX).read_bytes()
        )
    except (OSError, ValueError):
        record = None
    if record is None:
        return QuarantineRow(
            path=rel,
            reason=posixpath.dirname(rel).split("/")[0] or "unknown",
            message="no .reason.json beside it",
            time=_mtime(path),
        )
    try:
        when = utc_text(datetime.fromisoformat(record.time))
    except ValueError:
        when = _mtime(path)
    return QuarantineRow(
        path=rel,
        reason=record.reason,
        message=record.error,
        source=record.source or None,
        sop_instance_uid=record.sop_instance_uid,
        node=record.node or None,
        time=when,
    )


def _read_one(cfg: Config, rel: str) -> InstanceRow | None:
    try:
        return instance_row(cfg, rel)
    except OSError as exc:
        log.warning("%s: cannot read (%s); not indexed", cfg.archive / rel, exc.strerror)
        return None


def _read_chunk(cfg: Config, rels: list[str]) -> list[tuple[str, InstanceRow | None]]:
    return [(rel, _read_one(cfg, rel)) for rel in rels]


def read_archive(cfg: Config) -> Iterator[tuple[str, InstanceRow | None]]:
    """Every archived file's row, read by one process per core for a large archive."""
    rels = list(archive_files(cfg))
    workers = min(cfg.effective_workers, max(1, len(rels) // PARALLEL_FROM))
    if workers <= 1:
        for rel in rels:
            yield rel, _read_one(cfg, rel)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    chunks = [rels[i : i + CHUNK_FILES] for i in range(0, len(rels), CHUNK_FILES)]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for rows in pool.map(partial(_read_chunk, cfg), chunks):
            yield from rows


def with_outcomes(rows: list[InstanceRow]) -> list[InstanceRow]:
    """Several files of one SOP Instance UID: the first filed (the plain name, which a
    numbered ``~N`` name is longer than) is ``sorted``, the others are conflicts."""
    by_uid: dict[str, list[InstanceRow]] = {}
    for row in rows:
        by_uid.setdefault(row.sop_instance_uid, []).append(row)
    out: list[InstanceRow] = []
    for group in by_uid.values():
        group.sort(key=lambda r: (len(r.path), r.path))
        out.append(group[0])
        out += [replace(r, outcome="conflict") for r in group[1:]]
    return out


@dataclass
class RebuildReport:
    files: int = 0
    quarantined: int = 0
    added: int = 0
    removed: int = 0
    unreadable: list[str] = field(default_factory=list)


def rebuild(cfg: Config, index: Index) -> RebuildReport:
    """Make the index match the files: add what is missing, drop rows without a file.

    The walk and the header reads happen outside any transaction, so a running daemon
    goes on writing; rows a live run wrote keep their source and arrival time.
    """
    report = RebuildReport()
    disk: list[InstanceRow] = []
    for rel, row in read_archive(cfg):
        if row is None:
            report.unreadable.append(rel)
        else:
            disk.append(row)
    report.files = len(disk)
    on_disk = {(r.sop_instance_uid, r.path): r for r in with_outcomes(disk)}
    q_disk = {r.path: r for r in (quarantine_row(cfg, rel) for rel in quarantine_files(cfg))}
    report.quarantined = len(q_disk)

    with index.transaction():
        existing = {(r.sop_instance_uid, r.path): r for r in index.instance_rows()}
        q_existing = {r.path for r in index.quarantine_rows()}
        changed = [
            key
            for key, row in on_disk.items()
            if key in existing
            and (existing[key].sha256, existing[key].size) != (row.sha256, row.size)
        ]
        # A row whose file is gone; checked again now, as the walk may predate the file.
        gone = [
            key
            for key in existing
            if key not in on_disk and not os.path.lexists(cfg.archive / key[1])
        ]
        index.delete_instances([*gone, *changed])
        new = [row for key, row in on_disk.items() if key not in existing or key in changed]
        kept = {k: existing[k] for k in changed}
        new = [
            replace(r, source=kept[k].source, time=kept[k].time, node=kept[k].node)
            if (k := (r.sop_instance_uid, r.path)) in kept
            else r
            for r in new
        ]
        index.write(new)
        q_gone = [
            p for p in q_existing if p not in q_disk and not os.path.lexists(cfg.quarantine / p)
        ]
        index.delete_quarantined(q_gone)
        index.write([], [r for p, r in q_disk.items() if p not in q_existing])
        index.refresh_all()
    report.added = len(new) + len([p for p in q_disk if p not in q_existing])
    report.removed = len(gone) + len(q_gone)
    return report


@dataclass
class CheckReport:
    rows_without_files: list[str] = field(default_factory=list)
    files_without_rows: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.rows_without_files and not self.files_without_rows


def check(cfg: Config, index: Index) -> CheckReport:
    """Rows whose file is gone and files that have no row (archive and quarantine)."""
    report = CheckReport()
    rows = {r.path for r in index.instance_rows()}
    qrows = {r.path for r in index.quarantine_rows()}
    files = set(archive_files(cfg))
    qfiles = set(quarantine_files(cfg))
    report.rows_without_files = sorted(
        [str(cfg.archive / p) for p in rows - files]
        + [str(cfg.quarantine / p) for p in qrows - qfiles]
    )
    report.files_without_rows = sorted(
        [str(cfg.archive / p) for p in files - rows]
        + [str(cfg.quarantine / p) for p in qfiles - qrows]
    )
    return report
