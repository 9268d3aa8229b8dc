"""``index rebuild`` gives the rows a live run gives; ``index check`` finds every difference."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc, archived, inbox_files
from index_helpers import dicomwatch, engine, index_of, make_config, write_config

from dicomwatch.indexdb import InstanceRow, QuarantineRow

__all__ = ["engine"]


def _corpus(src: Path, make_dicom: Callable[..., Path]) -> None:
    """Plain files, a duplicate, a same-UID conflict, a taken name and two bad files."""
    for n in range(1, 7):
        make_dicom(f"s{n}.dcm", folder=src, InstanceNumber=n)
    make_dicom("mr.dcm", folder=src / "mr", SeriesInstanceUID="1.2.3.9", Modality="MR")
    a = make_dicom("same-uid.dcm", folder=src, SOPInstanceUID="1.2.3.4.5", InstanceNumber=40)
    make_dicom("same-uid-other.dcm", folder=src, SOPInstanceUID="1.2.3.4.5", InstanceNumber=40)
    (src / "dup.dcm").write_bytes(a.read_bytes())
    make_dicom("taken.dcm", folder=src, InstanceNumber=1)  # s1's name, another UID
    (src / "junk.dcm").write_bytes(b"junk")
    (src / "cut.dcm").write_bytes((src / "s2.dcm").read_bytes()[:300])


def _comparable(rows: list[InstanceRow], *ignore: str) -> list[InstanceRow]:
    blank = dict.fromkeys(("time", *ignore))
    return sorted((dataclasses.replace(r, **blank) for r in rows), key=_sorted_key)


def _qcomparable(rows: list[QuarantineRow]) -> list[QuarantineRow]:
    return sorted((dataclasses.replace(r, time=None) for r in rows), key=lambda r: r.path)


def _sorted_key(r: InstanceRow) -> tuple[str, str]:
    return (r.sop_instance_uid, r.path)


def test_a_rebuild_gives_the_rows_the_live_run_gave(
    tmp_path: Path, engine: str, make_dicom: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    _corpus(src, make_dicom)
    config = write_config(tmp_path, engine)
    assert dicomwatch("sort", "--config", str(config), "--no-progress", str(src)).returncode == 1
    cfg = make_config(tmp_path, engine)
    with index_of(cfg) as ix:
        live = ix.instance_rows()
        live_q = ix.quarantine_rows()
        live_series = ix.select("SELECT * FROM series ORDER BY series_instance_uid")
    assert {r.outcome for r in live} == {"sorted", "conflict"}
    assert len(live) == 10 and len(live_q) == 2

    # Rebuilding over the live index changes nothing, times and sources included.
    out = dicomwatch("index", "rebuild", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "0 rows added, 0 removed" in out.stdout
    with index_of(cfg) as ix:
        assert sorted(ix.instance_rows(), key=_sorted_key) == sorted(live, key=_sorted_key)

    # From nothing: the same rows; only the arrival time and the source are not in a file.
    with index_of(cfg) as ix, ix.transaction():
        for table in ("instances", "quarantine", "series", "studies"):
            ix.execute(f"DELETE FROM {table}")
    out = dicomwatch("index", "rebuild", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "12 rows added" in out.stdout
    with index_of(cfg) as ix:
        rebuilt = ix.instance_rows()
        rebuilt_q = ix.quarantine_rows()
        rebuilt_series = ix.select("SELECT * FROM series ORDER BY series_instance_uid")
    assert _comparable(rebuilt, "source") == _comparable(live, "source")
    assert _qcomparable(rebuilt_q) == _qcomparable(live_q)
    strip = ("first_arrival", "last_arrival")
    assert [{k: v for k, v in s.items() if k not in strip} for s in rebuilt_series] == [
        {k: v for k, v in s.items() if k not in strip} for s in live_series
    ]


def test_index_check_reports_rows_without_files_and_files_without_rows(
    tmp_path: Path, engine: str, make_dicom: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    _corpus(src, make_dicom)
    config = write_config(tmp_path, engine)
    dicomwatch("sort", "--config", str(config), "--no-progress", str(src))
    out = dicomwatch("index", "check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches" in out.stdout

    cfg = make_config(tmp_path, engine)
    gone = archived(cfg.archive)[0]
    gone.unlink()
    stray = cfg.archive / "stray" / "x.dcm"
    stray.parent.mkdir()
    stray.write_bytes(make_dicom("x.dcm").read_bytes())
    (qgone,) = [p for p in (cfg.quarantine / "not_dicom").iterdir() if p.suffix == ".dcm"]
    qgone.unlink()
    out = dicomwatch("index", "check", "--config", str(config))
    assert out.returncode == 1
    assert f"row without file: {gone}" in out.stdout
    assert f"row without file: {qgone}" in out.stdout
    assert f"file without row: {stray}" in out.stdout
    assert "2 rows without files, 1 files without rows" in out.stderr

    assert dicomwatch("index", "rebuild", "--config", str(config)).returncode == 0
    out = dicomwatch("index", "check", "--config", str(config))
    assert out.returncode == 0, out.stdout


def test_after_kill_9_mid_burst_and_a_restart_the_index_matches_the_archive(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    made = tmp_path / "made"
    total = 80
    for n in range(total):
        make_dicom(f"f{n:03d}.dcm", folder=made, InstanceNumber=n)
    daemon = DaemonProc(tmp_path, index="sqlite", settle_seconds=0.1)
    daemon.start()
    try:
        for path in sorted(made.iterdir()):
            path.rename(daemon.inbox / path.name)
        assert wait_for(lambda: len(archived(daemon.archive)) >= total // 4, 60)
        daemon.kill()  # SIGKILL: no flush, no clean-up
        assert len(archived(daemon.archive)) < total or True
        daemon.start()
        assert wait_for(
            lambda: len(archived(daemon.archive)) == total and not inbox_files(daemon.inbox), 60
        ), daemon.log_path.read_text()
    finally:
        assert daemon.stop(signal.SIGTERM) == 0
    out = dicomwatch("index", "check", "--config", str(daemon.config_path))
    assert out.returncode == 0, out.stdout + out.stderr + daemon.log_path.read_text()
    cfg = make_config(tmp_path, "sqlite", state_dir=str(tmp_path / "state-a"))
    with index_of(cfg) as ix:
        rows = ix.instance_rows()
    assert len(rows) == total == len({r.sop_instance_uid for r in rows})


def test_a_large_archive_is_read_by_a_pool_with_the_same_rows(
    tmp_path: Path, make_dicom: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomwatch import rebuild

    src = tmp_path / "src"
    _corpus(src, make_dicom)
    config = write_config(tmp_path, "sqlite")
    dicomwatch("sort", "--config", str(config), "--no-progress", str(src))
    cfg = make_config(tmp_path, "sqlite", workers=2)
    serial = list(rebuild.read_archive(cfg))
    monkeypatch.setattr(rebuild, "PARALLEL_FROM", 2)
    monkeypatch.setattr(rebuild, "CHUNK_FILES", 3)
    pooled = list(rebuild.read_archive(cfg))
    assert pooled == serial and len(serial) == 10
