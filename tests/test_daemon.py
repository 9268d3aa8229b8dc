"""``dicomwatch run`` as a subprocess: real observers, real files, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import build_dataset, wait_for
from daemon_helpers import (
    DaemonProc,
    archived,
    archived_uids,
    inbox_files,
    slow_write,
    temporaries,
)
from pydicom import dcmread


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    made: list[DaemonProc] = []

    def make(name: str = "a", **overrides: object) -> DaemonProc:
        d = DaemonProc(tmp_path, name, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()


def dicom_bytes(i: int, **tags: object) -> bytes:
    import io

    ds = build_dataset(
        seed=i, SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.7.{i}", InstanceNumber=i, **tags
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Deliver a file the way cp does: create, write, close."""
    path = inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_once_files_what_is_already_there(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons(settle_seconds=0.1)
    d.inbox.mkdir()
    for i in range(5):
        drop(d.inbox, f"sub/{i}.dcm", dicom_bytes(i))
    (d.inbox / "note.txt").write_text("hello")
    d.start("--once")
    assert d.wait_exit(60) == 1  # one file was quarantined
    assert len(archived(d.archive)) == 5
    assert inbox_files(d.inbox) == []
    outcomes = sorted(r["outcome"] for r in d.files())
    assert outcomes == ["quarantined"] + ["sorted"] * 5


@pytest.mark.parametrize("observer", ["native", "polling"])
def test_files_dropped_while_running_are_filed(
    daemons: Callable[..., DaemonProc], observer: str
) -> None:
    d = daemons(observer=observer, polling_interval_seconds=0.2, rescan_seconds=3600)
    d.start()
    for i in range(20):
        drop(d.inbox, f"{i}.dcm", dicom_bytes(i))
    assert wait_for(lambda: len(archived(d.archive)) == 20, 30), d.log_path.read_text()
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert d.stop() == 0
    assert len(d.files()) == 20, "one result line per file"
    assert {r["outcome"] for r in d.files()} == {"sorted"}


def test_slow_writer_is_never_filed_partial(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons(settle_seconds=1.0)
    d.start()
    data = dicom_bytes(1, rows=256, columns=256)
    slow_write(d.inbox / "slow.dcm", data, chunks=8, pause=0.5)  # pauses < settle_seconds
    assert wait_for(lambda: len(archived(d.archive)) == 1, 30)
    assert d.stop() == 0
    assert [r["outcome"] for r in d.files()] == ["sorted"]
    out = dcmread(archived(d.archive)[0])
    assert out.PixelData == dcmread(__import__("io").BytesIO(data)).PixelData
    assert not d.quarantine.exists() or list(d.quarantine.rglob("*.json")) == []


def test_temp_names_are_ignored_until_renamed(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons()
    d.start()
    tmp_names = [".x.dcm.AbC123", "y.part", "z.tmp", "w.partial", "v~"]
    for i, name in enumerate(tmp_names):
        drop(d.inbox, name, dicom_bytes(i))
    drop(d.inbox, "marker.dcm", dicom_bytes(99))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20)
    assert sorted(p.name for p in d.inbox.iterdir() if p.is_file()) == sorted(tmp_names)
    os.rename(d.inbox / ".x.dcm.AbC123", d.inbox / "x.dcm")  # rsync's final rename
    os.rename(d.inbox / "y.part", d.inbox / "y.dcm")
    assert wait_for(lambda: len(archived(d.archive)) == 3, 20)
    assert d.stop() == 0


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_real_rsync_delivery(daemons: Callable[..., DaemonProc], tmp_path: Path) -> None:
    d = daemons()
    d.start()
    src = tmp_path / "outbox"
    src.mkdir()
    for i in range(30):
        (src / f"im{i:03d}.dcm").write_bytes(dicom_bytes(i, rows=64, columns=64))
    subprocess.run(["rsync", "-a", f"{src}/", f"{d.inbox}/"], check=True)
    assert wait_for(lambda: len(archived(d.archive)) == 30, 30)
    assert d.stop() == 0
    assert len(set(archived_uids(d.archive))) == 30
    assert {r["outcome"] for r in d.files()} == {"sorted"}


def test_files_present_before_start_and_a_burst(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons()
    d.inbox.mkdir()
    for i in range(300):
        drop(d.inbox, f"pre/{i}.dcm", dicom_bytes(i))
    d.start()
    for i in range(300, 2300):
        drop(d.inbox, f"burst/{i % 50}/{i}.dcm", dicom_bytes(i))
    assert wait_for(lambda: len(archived(d.archive)) == 2300, 180), d.log_path.read_text()[-3000:]
    assert d.stop() == 0
    assert len(set(archived_uids(d.archive))) == 2300
    assert [p for p in inbox_files(d.inbox)] == []


def test_special_files_are_left_alone(daemons: Callable[..., DaemonProc], tmp_path: Path) -> None:
    d = daemons()
    d.inbox.mkdir()
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(dicom_bytes(1, PatientID="SECRET"))
    os.symlink(secret, d.inbox / "link.dcm")
    os.mkfifo(d.inbox / "fifo.dcm")
    (d.inbox / "folder.dcm").mkdir()
    drop(d.inbox, "real.dcm", dicom_bytes(2))
    d.start()
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20)
    assert wait_for(lambda: d.count_lines("fifo.dcm") >= 1 and d.count_lines("link.dcm") >= 1, 10)
    assert d.stop() == 0
    assert dcmread(archived(d.archive)[0]).PatientID != "SECRET"
    assert (d.inbox / "link.dcm").is_symlink() and secret.exists()
    assert not d.quarantine.exists() or not any(d.quarantine.rglob("*.dcm"))
    assert d.count_lines("link.dcm") == 1, "logged once"


def test_sigterm_finishes_in_flight_and_exits_zero(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons(workers=1)
    d.start()
    for i in range(200):
        drop(d.inbox, f"{i}.dcm", dicom_bytes(i, rows=128, columns=128))
    assert wait_for(lambda: len(archived(d.archive)) >= 5, 30)
    assert d.stop(signal.SIGTERM) == 0
    filed = archived_uids(d.archive)
    remaining = [p for p in inbox_files(d.inbox)]
    assert len(filed) == len(set(filed))
    assert len(filed) + len(remaining) == 200, "nothing lost, nothing doubled"
    claims = d.inbox / ".dicomwatch" / "claims" / "a"
    assert not claims.exists() or not any(p.is_file() for p in claims.rglob("*")), (
        "unstarted claims are handed back to the inbox on a clean stop"
    )
    assert temporaries(d.archive, d.quarantine) == []
    d.start()
    assert wait_for(lambda: len(archived(d.archive)) == 200, 60)
    assert d.stop() == 0


def test_sigkill_mid_burst_then_restart_loses_nothing(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons()
    d.start()
    for i in range(300):
        drop(d.inbox, f"{i}.dcm", dicom_bytes(i))
    assert wait_for(lambda: len(archived(d.archive)) >= 20, 30)
    d.kill()
    d.start()
    assert wait_for(lambda: len(archived(d.archive)) == 300 and inbox_files(d.inbox) == [], 60)
    assert d.stop() == 0
    uids = archived_uids(d.archive)
    assert len(uids) == 300 and len(set(uids)) == 300
    assert temporaries(d.archive, d.quarantine) == []


def test_two_daemons_share_one_inbox(daemons: Callable[..., DaemonProc], tmp_path: Path) -> None:
    a = daemons("a")
    b = daemons("b")
    a.start()
    b.start()
    for i in range(600):
        drop(a.inbox, f"{i % 20}/{i}.dcm", dicom_bytes(i))
    assert wait_for(lambda: len(archived(a.archive)) >= 600, 90)
    assert wait_for(lambda: inbox_files(a.inbox) == [], 20)
    assert a.stop() == 0 and b.stop() == 0
    uids = archived_uids(a.archive)
    assert len(uids) == 600 and len(set(uids)) == 600
    by_a, by_b = len(a.files()), len(b.files())
    assert by_a + by_b == 600 and by_a > 0 and by_b > 0
    assert {r["outcome"] for r in a.files() + b.files()} == {"sorted"}


def test_same_node_id_twice_is_refused(daemons: Callable[..., DaemonProc], tmp_path: Path) -> None:
    a = daemons("a")
    a.start()
    twin = DaemonProc(tmp_path, "a2", node_id="a")
    twin.start(wait=False)
    assert twin.wait_exit(30) == 78
    assert twin.count_lines("another dicomwatch with node_id") == 1
    assert a.stop() == 0


def test_sighup_reloads_valid_config_and_keeps_old_on_error(
    daemons: Callable[..., DaemonProc],
) -> None:
    d = daemons()
    d.start()
    d.write_config(template="{PatientID}/{Modality}.{SOPInstanceUID}.dcm")
    d.send(signal.SIGHUP)
    assert wait_for(lambda: d.count_lines("config reloaded") == 1, 10)
    drop(d.inbox, "a.dcm", dicom_bytes(1))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20)
    assert (
        archived(d.archive)[0].relative_to(d.archive).as_posix()
        == "pid001/CT.1.2.826.0.1.3680043.8.498.7.1.dcm"
    )
    d.config_path.write_text("settle_seconds: [oops\n")
    d.send(signal.SIGHUP)
    assert wait_for(lambda: d.count_lines("config not reloaded") == 1, 10)
    drop(d.inbox, "b.dcm", dicom_bytes(2))
    assert wait_for(lambda: len(archived(d.archive)) == 2, 20)
    assert d.stop() == 0


def test_after_filing_move_keeps_originals(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    d = daemons(after_filing="move")
    d.start()
    data = dicom_bytes(1)
    drop(d.inbox, "ward/x.dcm", data)
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20)
    assert wait_for(lambda: (tmp_path / "processed" / "ward" / "x.dcm").exists(), 10)
    assert (tmp_path / "processed" / "ward" / "x.dcm").read_bytes() == data
    assert d.stop() == 0


def test_empty_inbox_folders_are_removed_after_grace(daemons: Callable[..., DaemonProc]) -> None:
    d = daemons(empty_dir_grace_seconds=0.5, rescan_seconds=0.5)
    d.start()
    drop(d.inbox, "study/series/x.dcm", dicom_bytes(1))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20)
    assert wait_for(lambda: not (d.inbox / "study").exists(), 20)
    assert d.inbox.is_dir()
    assert d.stop() == 0


def test_systemd_notify_protocol(daemons: Callable[..., DaemonProc], tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def received(needle: str) -> bool:
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        return any(needle in m for m in messages)

    try:
        d = daemons()
        d.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        assert wait_for(lambda: received("READY=1"), 20)
        assert wait_for(lambda: received("WATCHDOG=1"), 10)
        assert wait_for(lambda: received("STATUS="), 10)
        assert d.stop() == 0
        assert received("STOPPING=1")
    finally:
        sock.close()


def test_worker_deaths_are_counted_and_the_file_quarantined(
    daemons: Callable[..., DaemonProc],
) -> None:
    """Workers die (SIGKILL, as the OOM killer does) while holding a file: the daemon
    replaces them, counts the attempts and quarantines the file; it never goes down."""
    psutil = pytest.importorskip("psutil")
    d = daemons(workers=1, max_attempts=3)
    d.start()
    proc = psutil.Process(d.proc.pid if d.proc else 0)

    def workers() -> list[int]:
        """Worker processes are the fork server's children; zombies are already dead."""
        pids = []
        for child in proc.children():
            try:
                if "forkserver" in " ".join(child.cmdline()):
                    pids += [w.pid for w in child.children() if w.status() != psutil.STATUS_ZOMBIE]
            except psutil.Error:
                continue
        return pids

    assert wait_for(lambda: len(workers()) == 1, 20)
    data = dicom_bytes(1, rows=2048, columns=2048)  # 8 MB: slow enough to be killed holding it
    drop(d.inbox, "poison.dcm", data)
    deadline = __import__("time").monotonic() + 60
    while d.count_lines("died") < 3 and not archived(d.archive):
        assert __import__("time").monotonic() < deadline, d.log_path.read_text()[-2000:]
        for pid in workers():
            with __import__("contextlib").suppress(ProcessLookupError, psutil.Error):
                os.kill(pid, signal.SIGKILL)

    def final() -> list[dict[str, object]]:
        return [r for r in d.files() if r["outcome"] != "failed"]

    assert wait_for(lambda: bool(final()), 30), d.log_path.read_text()[-2000:]
    outcome = final()[0]
    if outcome["outcome"] == "quarantined":
        assert outcome["reason"] == "worker_crash"
        kept = d.quarantine / "worker_crash" / "poison.dcm"
        assert kept.read_bytes() == data
    else:  # it slipped through between two kills: filed whole
        assert outcome["outcome"] == "sorted"
        assert (
            dcmread(archived(d.archive)[0]).PixelData
            == dcmread(__import__("io").BytesIO(data)).PixelData
        )
    assert d.proc is not None and d.proc.poll() is None, "the daemon is still running"
    assert inbox_files(d.inbox) == []
    drop(d.inbox, "next.dcm", dicom_bytes(2))
    assert wait_for(lambda: any(r["source"].endswith("next.dcm") for r in d.files()), 20)
    assert d.stop() == 0


# ----- reload, time limit and stuck files, as an admin sees them -------------------------


def test_sighup_adding_an_ignore_pattern_stops_filing_those_names(
    daemons: Callable[..., DaemonProc],
) -> None:
    """The log said ``config reloaded (ignore)`` while the running watcher kept its
    patterns and ``x.hold`` was filed anyway."""
    d = daemons()
    d.start()
    d.write_config(ignore=[".*", "*.part", "*.tmp", "*.partial", "*~", "*.hold"])
    d.send(signal.SIGHUP)
    assert wait_for(lambda: d.count_lines("config reloaded") == 1), d.log_path.read_text()
    held = drop(d.inbox, "x.hold", dicom_bytes(1))
    drop(d.inbox, "y.dcm", dicom_bytes(2))
    assert wait_for(lambda: len(archived(d.archive)) == 1), d.log_path.read_text()
    # Past a rescan (rescan_seconds 3) and then some: the held file stays where it is.
    assert not wait_for(lambda: not held.exists(), timeout=5.0)
    assert archived_uids(d.archive) == ["1.2.826.0.1.3680043.8.498.7.2"]
    assert d.stop() == 0


def _workers_of(d: DaemonProc) -> list[int]:
    """The worker processes: children of the fork server, which is the daemon's child."""
    import psutil

    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)
    return [w.pid for child in daemon.children() for w in child.children()]


def test_a_wedged_worker_is_killed_at_the_time_limit(daemons: Callable[..., DaemonProc]) -> None:
    """SIGSTOP the only worker (a hung decoder, a read stuck on NFS): before, the files
    waited for ever with no warning; now the worker is killed at task_timeout_seconds,
    a warning says so, and the files are filed by its replacement."""
    d = daemons(workers=1, task_timeout_seconds=2.0)
    d.start()
    assert wait_for(lambda: len(_workers_of(d)) == 1)
    (wedged,) = _workers_of(d)
    os.kill(wedged, signal.SIGSTOP)
    for i in range(3):
        drop(d.inbox, f"f{i}.dcm", dicom_bytes(i))
    assert wait_for(lambda: len(archived(d.archive)) == 3, timeout=40), d.log_path.read_text()
    timeouts = [r for r in d.records() if "task_timeout_seconds" in str(r.get("msg", ""))]
    assert len(timeouts) == 1 and timeouts[0]["level"] == "warning", timeouts
    failed = [r for r in d.files() if r["outcome"] == "failed"]
    assert [r["reason"] for r in failed] == ["timeout"]
    assert wedged not in _workers_of(d)
    assert d.stop() == 0


@pytest.mark.skipif(
    shutil.which("chattr") is None or os.geteuid() != 0, reason="needs root and chattr"
)
def test_files_that_cannot_be_claimed_show_as_stuck(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    """A sender folder the daemon may not rename out of: before, ``failing 0, pending 0``
    in every summary; now ``stuck 2 (oldest ...)`` and one warning per file."""
    d = daemons(summary_seconds=0.5, stuck_warning_seconds=1.0)
    study = d.inbox / "study1"
    study.mkdir(parents=True)
    for i in range(2):
        drop(study, f"{i}.dcm", dicom_bytes(i))
    chattr = subprocess.run(["chattr", "+i", str(study)], capture_output=True, check=False)
    if chattr.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {chattr.stderr!r}")
    try:
        d.start()
        assert wait_for(
            lambda: any("stuck 2 (oldest" in str(r.get("msg")) for r in d.records()), 20
        ), d.log_path.read_text()
        assert wait_for(lambda: d.count_lines("stuck for") == 2, 20), d.log_path.read_text()
    finally:
        subprocess.run(["chattr", "-i", str(study)], check=True)
    assert wait_for(lambda: len(archived(d.archive)) == 2, 30), d.log_path.read_text()
    assert d.stop() == 0
    final = [str(r["msg"]) for r in d.records() if str(r.get("msg", "")).startswith("final:")]
    assert "stuck 0," in final[-1], final
