"""The archive index: what ``sort`` and ``run`` write, its schema and its failure modes."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc
from index_helpers import dicomwatch, engine, index_of, make_config, write_config

from dicomwatch import fstype
from dicomwatch.config import config_from_mapping
from dicomwatch.errors import ConfigError
from dicomwatch.indexdb import (
    SCHEMA_VERSION,
    IndexError_,
    IndexMissing,
    InstanceRow,
    open_index,
    sqlite_path,
)
from dicomwatch.indexsink import IndexSink
from dicomwatch.result import Instance, Outcome, Result
from dicomwatch.sorter import Task

__all__ = ["engine"]  # the fixture, imported for its parametrisation


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_network_filesystems_are_named_by_their_magic_numbers() -> None:
    assert fstype.network_filesystem(0x6969) == "NFS"
    assert fstype.network_filesystem(0x517B) == "SMB"
    assert fstype.network_filesystem(0xFF534D42) == "CIFS"
    assert fstype.network_filesystem(0xFE534D42) == "SMB2"
    assert fstype.network_filesystem(0x65735546) == "FUSE"
    # statfs gives f_type as a signed long: CIFS's magic arrives negative on some ABIs.
    assert fstype.network_filesystem(0xFF534D42 - (1 << 32)) == "CIFS"
    assert fstype.network_filesystem(0xEF53) is None  # ext4
    assert fstype.network_filesystem(0x58465342) is None  # XFS
    assert fstype.network_filesystem(0x01021994) is None  # tmpfs


def test_a_local_state_dir_is_accepted(tmp_path: Path) -> None:
    magic = fstype.filesystem_magic(tmp_path)
    assert magic is not None and fstype.network_filesystem(magic) is None
    from dicomwatch.indexdb import check_location

    check_location(make_config(tmp_path, "sqlite"))


def test_config_keys(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "sqlite")
    assert cfg.state_dir == tmp_path / "state" and cfg.index == "sqlite"
    assert make_config(tmp_path, "none").index == "none"
    with pytest.raises(ConfigError, match="postgresql://"):
        make_config(tmp_path, "mysql://x")
    with pytest.raises(ConfigError, match="inside the inbox"):
        make_config(tmp_path, "sqlite", state_dir=str(tmp_path / "inbox" / "state"))
    default = config_from_mapping({}, source="t")
    assert default.state_dir.name == ".dicomwatch-state" and default.state_dir.is_absolute()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sort_indexes_every_file_it_files(
    tmp_path: Path, engine: str, make_dicom: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    a = make_dicom("a.dcm", folder=src, InstanceNumber=1)
    make_dicom("b.dcm", folder=src, InstanceNumber=2)
    other = make_dicom(
        "c.dcm", folder=src, SeriesInstanceUID="1.2.3.9", InstanceNumber=1, Modality="MR"
    )
    (src / "again.dcm").write_bytes(a.read_bytes())  # a duplicate of a
    (src / "junk.dcm").write_bytes(b"not dicom at all")
    config = write_config(tmp_path, engine)
    out = dicomwatch("sort", "--config", str(config), "--no-progress", str(src))
    assert out.returncode == 1, out.stderr  # the junk file was quarantined

    cfg = make_config(tmp_path, engine)
    with index_of(cfg) as ix:
        rows = ix.instance_rows()
        quarantined = ix.quarantine_rows()
        series = {r["series_instance_uid"]: r for r in ix.select("SELECT * FROM series")}
        studies = ix.select("SELECT * FROM studies")
    assert len(rows) == 3  # the duplicate is the same file, the same row
    for row in rows:
        archived = cfg.archive / row.path
        assert archived.is_file()
        assert row.sha256 == _sha(archived) and row.size == archived.stat().st_size
        assert row.node == "n1" and row.time and row.time.endswith("Z")
        assert row.transfer_syntax == "1.2.840.10008.1.2.1"
        assert row.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
        assert row.patient_id == "PID001" and row.outcome == "sorted"
    # a.dcm and again.dcm are one file: whichever a worker finished first has the row.
    by_source = {Path(r.source or "").name.replace("again", "a"): r for r in rows}
    assert set(by_source) == {"a.dcm", "b.dcm", "c.dcm"}
    assert by_source["c.dcm"].modality == "MR" and by_source["c.dcm"].series_number is None
    assert series["1.2.826.0.1.3680043.8.498.2"]["instances"] == 2
    assert series["1.2.3.9"]["instances"] == 1
    assert series["1.2.3.9"]["folder"] == by_source["c.dcm"].folder
    assert len(studies) == 1 and studies[0]["series"] == 2 and studies[0]["instances"] == 3
    assert studies[0]["first_arrival"] <= studies[0]["last_arrival"]
    assert [q.reason for q in quarantined] == ["not_dicom"]
    assert (cfg.quarantine / quarantined[0].path).read_bytes() == b"not dicom at all"
    assert quarantined[0].source == str(src / "junk.dcm") and quarantined[0].message
    assert other.exists()


def test_index_none_writes_no_index(tmp_path: Path, make_dicom: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    make_dicom("a.dcm", folder=src)
    out = dicomwatch("sort", "--config", str(write_config(tmp_path, "none")), str(src))
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "state").exists()


def test_dry_run_writes_no_index(tmp_path: Path, make_dicom: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    make_dicom("a.dcm", folder=src)
    config = write_config(tmp_path, "sqlite")
    out = dicomwatch("sort", "--config", str(config), "--dry-run", str(src))
    assert out.returncode == 0, out.stderr
    assert not sqlite_path(make_config(tmp_path, "sqlite")).exists()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE instances (
    id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL, path TEXT NOT NULL,
    series_instance_uid TEXT, study_instance_uid TEXT, patient_id TEXT, modality TEXT,
    study_date TEXT, series_number TEXT, instance_number TEXT, size BIGINT, sha256 TEXT,
    transfer_syntax TEXT, source TEXT, outcome TEXT NOT NULL, node TEXT, time TEXT NOT NULL,
    indexed_at TEXT NOT NULL DEFAULT 'x', UNIQUE (sop_instance_uid, path));
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, reason TEXT NOT NULL, message TEXT,
    source TEXT, sop_instance_uid TEXT, node TEXT, time TEXT NOT NULL,
    indexed_at TEXT NOT NULL DEFAULT 'x');
INSERT INTO instances (sop_instance_uid, path, series_instance_uid, study_instance_uid,
    outcome, time) VALUES
    ('1.1', 'P/2024/s1/1.dcm', 'se1', 'st1', 'sorted', '2024-01-01T00:00:00.000Z'),
    ('1.2', 'P/2024/s1/2.dcm', 'se1', 'st1', 'sorted', '2024-01-01T00:00:05.000Z'),
    ('1.3', 'P/2024/s2/1.dcm', 'se2', 'st1', 'sorted', '2024-01-01T00:00:09.000Z');
"""


def test_an_index_of_the_first_schema_is_migrated(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "sqlite")
    cfg.state_dir.mkdir()
    with sqlite3.connect(sqlite_path(cfg)) as conn:
        conn.executescript(V1_SCHEMA)
    conn.close()
    with open_index(cfg) as ix:
        assert ix.schema_version() == SCHEMA_VERSION == 2
        series = ix.select("SELECT * FROM series ORDER BY series_instance_uid")
        studies = ix.select("SELECT * FROM studies")
        folders = ix.select("SELECT path, folder FROM instances ORDER BY path")
    assert [(s["series_instance_uid"], s["instances"], s["folder"]) for s in series] == [
        ("se1", 2, "P/2024/s1"),
        ("se2", 1, "P/2024/s2"),
    ]
    assert series[0]["first_arrival"] == "2024-01-01T00:00:00.000Z"
    assert series[0]["last_arrival"] == "2024-01-01T00:00:05.000Z"
    assert studies[0]["series"] == 2 and studies[0]["instances"] == 3
    assert studies[0]["folder"] == "P/2024"
    assert all(f["folder"] == str(Path(f["path"]).parent) for f in folders)
    with sqlite3.connect(sqlite_path(cfg)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_an_index_newer_than_the_code_is_refused(tmp_path: Path, engine: str) -> None:
    cfg = make_config(tmp_path, engine)
    with open_index(cfg) as ix, ix.transaction():
        ix.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(IndexError_, match="schema version 99, newer"):
        open_index(cfg)


def test_readers_do_not_create_an_index(tmp_path: Path) -> None:
    with pytest.raises(IndexMissing, match="index rebuild"):
        open_index(make_config(tmp_path, "sqlite"), create=False)


def _result(cfg_archive: Path, n: int) -> Result:
    dest = cfg_archive / "P" / f"{n}.dcm"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"x" * n)
    return Result(
        outcome=Outcome.SORTED,
        source=f"/in/{n}.dcm",
        destination=str(dest),
        sop_instance_uid=f"1.2.{n}",
        ts_in="1.2.840.10008.1.2.1",
        instance=Instance(series_instance_uid="se", study_instance_uid="st", patient_id="P"),
        sha256=hashlib.sha256(b"x" * n).hexdigest(),
    )


def test_an_unavailable_index_never_stops_filing_and_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(tmp_path, "sqlite")
    cfg.state_dir.mkdir()
    db = sqlite_path(cfg)
    db.write_bytes(b"this is not an SQLite database, it is garbage" * 100)
    clock = FakeClock()
    sink = IndexSink(cfg, "t", clock=clock, max_buffer=5)
    task = Task(path="/in/x", source="/in/x")
    caplog.set_level(logging.INFO)
    for n in range(1, 4):
        sink.on_result(task, _result(cfg.archive, n))
    sink.flush()
    sink.flush()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "index unavailable" in errors[0].getMessage()
    assert "Filing goes on" in errors[0].getMessage()
    assert sink.pending == 3 and sink.down

    for n in range(4, 8):  # two more than the buffer holds
        sink.on_result(task, _result(cfg.archive, n))
    assert sink.pending == 5 and sink.dropped == 2
    overflow = [r.getMessage() for r in caplog.records if "the most kept" in r.getMessage()]
    assert len(overflow) == 1 and "dicomwatch index rebuild" in overflow[0]

    db.unlink()  # the admin moves the broken file aside
    sink.flush()  # still backing off: nothing happens yet
    assert sink.pending == 5
    clock.now += 120
    sink.flush()
    assert sink.pending == 0 and not sink.down
    assert any("available again" in r.getMessage() for r in caplog.records)
    assert any("not kept" in r.getMessage() for r in caplog.records)
    with index_of(cfg) as ix:
        assert sorted(r.sop_instance_uid for r in ix.instance_rows()) == [
            f"1.2.{n}" for n in range(1, 6)
        ]
    sink.close()


def test_rows_a_killed_process_left_in_its_journal_are_written_by_the_next(
    tmp_path: Path, engine: str
) -> None:
    cfg = make_config(tmp_path, engine)
    first = IndexSink(cfg, "first")
    task = Task(path="/in/x", source="/in/x")
    for n in range(1, 4):
        first.on_result(task, _result(cfg.archive, n))
    assert first.journal is not None and first.journal.path.stat().st_size > 0
    first.journal._finalizer()  # what the kernel does when the process dies

    second = IndexSink(cfg, "second")
    assert second.pending == 3
    assert not first.journal.path.exists()  # adopted into the second one's journal
    second.flush()
    with index_of(cfg) as ix:
        assert len(ix.instance_rows()) == 3
    second.close()
    assert second.journal is not None and not second.journal.path.exists()


def test_rows_are_written_once_however_often_they_arrive(tmp_path: Path, engine: str) -> None:
    cfg = make_config(tmp_path, engine)
    row = InstanceRow(sop_instance_uid="1.2.3", path="P/1.dcm", series_instance_uid="se")
    with open_index(cfg) as ix:
        ix.write([row])
        ix.write([row, row])
        assert len(ix.instance_rows()) == 1
        assert ix.select("SELECT instances FROM series")[0]["instances"] == 1


def test_hostile_values_are_stored_as_text(tmp_path: Path, engine: str) -> None:
    cfg = make_config(tmp_path, engine)
    odd = "O'Brien%_\x00\udcff;DROP TABLE instances"
    row = InstanceRow(sop_instance_uid="1.2.3", path="P/1.dcm", patient_id=odd, source=odd)
    with open_index(cfg) as ix:
        ix.write([row])
        (got,) = ix.instance_rows()
    assert got.patient_id is not None and got.patient_id.startswith("O'Brien%_")
    assert "\\udcff;DROP TABLE instances" in got.patient_id


def test_the_daemon_writes_rows_while_it_runs(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    daemon = DaemonProc(tmp_path, state_dir=str(tmp_path / "state"), index="sqlite")
    cfg = make_config(tmp_path, "sqlite", node_id="a")
    daemon.start()
    try:
        for n in range(5):
            make_dicom(f"f{n}.dcm", folder=daemon.inbox, InstanceNumber=n)

        def indexed() -> bool:
            try:
                with index_of(cfg) as ix:
                    return len(ix.instance_rows()) == 5
            except IndexError_:
                return False

        assert wait_for(indexed, 30), daemon.log_path.read_text()
    finally:
        assert daemon.stop() == 0
    with index_of(cfg) as ix:
        rows = ix.instance_rows()
    assert {r.node for r in rows} == {"a"}
    assert list((tmp_path / "state" / "journal").glob("*.jsonl")) == []  # a clean stop
    assert all(r.source and r.source.startswith(str(daemon.inbox)) for r in rows)
