"""A hostile sender (anyone who can write the inbox) against real daemons.

What a sender can do to the inbox: rename or replace ``inbox/.dicomwatch``, plant
symlinks, FIFOs and folders anywhere they can write, swap a folder for a symlink while
the daemon works in it, delete or rename the inbox itself if they can write its parent.
None of it may make the daemon read, move or delete anything outside the inbox, remove
archived files, or let a second daemon with the same ``node_id`` run beside the first.

Each test runs ``dicomwatch run`` as a subprocess on real folders (``tmp_path``) and
checks the folders afterwards; waits poll with a deadline.  The one timed loop (the
folder-swapping race) is the attacker's timing, not synchronisation.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_dataset, wait_for
from daemon_helpers import DaemonProc, archived, archived_uids

UID = "1.2.826.0.1.3680043.8.498.15"


def dicom(i: int, **tags: object) -> bytes:
    ds = build_dataset(seed=i, SOPInstanceUID=f"{UID}.{i}", InstanceNumber=i, **tags)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root`` (links not followed): bytes, ``dir`` or the link text."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def archive_files(archive: Path) -> dict[str, bytes]:
    return {str(p.relative_to(archive)): p.read_bytes() for p in archived(archive)}


def tail(d: DaemonProc) -> str:
    try:
        return d.log_path.read_text(errors="replace")[-4000:]
    except FileNotFoundError:
        return ""


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    made: list[DaemonProc] = []

    def make(name: str = "a", **overrides: Any) -> DaemonProc:
        d = DaemonProc(tmp_path, name, **overrides)
        d.inbox.mkdir(exist_ok=True)
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()


def outside_folder(tmp_path: Path, count: int = 3) -> Path:
    """Files a sender must never get the daemon to touch."""
    outside = tmp_path / "elsewhere"
    (outside / "deeper").mkdir(parents=True)
    for i in range(count):
        (outside / f"o{i}.dcm").write_bytes(dicom(900 + i))
    (outside / "deeper" / "d.dcm").write_bytes(dicom(990))
    return outside


def run_once(d: DaemonProc) -> int:
    d.start("--once")
    return d.wait_exit(60)


def fill_archive(d: DaemonProc, count: int) -> dict[str, bytes]:
    for i in range(count):
        (d.inbox / f"x{i}.dcm").write_bytes(dicom(i))
    assert run_once(d) == 0, tail(d)
    filed = archive_files(d.archive)
    assert len(filed) == count
    return filed


def plant_internal_folder(inbox: Path, node: str, target: Path) -> None:
    """What a sender can do without any rights on dicomwatch's own folder: move it
    aside and make a new one, with the node's claim folder a symlink to ``target``."""
    (inbox / ".dicomwatch").rename(inbox / ".old")
    (inbox / ".dicomwatch" / "claims").mkdir(parents=True)
    (inbox / ".dicomwatch" / "claims" / node).symlink_to(target)


# ----- 1. the archive emptied through a planted claims link ---------------------------------


def test_a_claim_folder_linked_to_the_archive_is_refused_and_the_archive_kept(
    daemons: Callable[..., DaemonProc],
) -> None:
    d = daemons()
    before = fill_archive(d, 6)
    plant_internal_folder(d.inbox, "a", d.archive)
    assert run_once(d) == 78, tail(d)
    assert d.count_lines("is a symbolic link") >= 1, tail(d)
    assert archive_files(d.archive) == before, "archived files were removed"
    assert not [r for r in d.files() if r.get("outcome") == "duplicate"]


# ----- 2. planted links and dead nodes reaching outside -------------------------------------


def test_a_claim_folder_linked_outside_at_start_is_refused(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    d = daemons()
    outside = outside_folder(tmp_path)
    before = tree(outside)
    (d.inbox / ".dicomwatch" / "claims").mkdir(parents=True)
    (d.inbox / ".dicomwatch" / "claims" / "a").symlink_to(outside)
    assert run_once(d) == 78, tail(d)
    assert d.count_lines("another") == 0 and d.count_lines("is a symbolic link") >= 1
    assert tree(outside) == before
    assert archived(d.archive) == []


def test_a_claim_folder_planted_while_running_never_receives_a_file(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    """The running daemon claims only into the folder it opened and checked; once its
    internal folder is replaced by one it must not use, it claims nothing (each file
    logged as not claimable) until the operator removes the planted folder."""
    d = daemons()
    outside = outside_folder(tmp_path)
    d.start()
    (d.inbox / "first.dcm").write_bytes(dicom(1))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20), tail(d)
    plant_internal_folder(d.inbox, "a", outside)
    before = tree(outside)
    (d.inbox / "ward").mkdir()
    (d.inbox / "ward" / "second.dcm").write_bytes(dicom(2))
    assert wait_for(lambda: d.count_lines("ward/second.dcm yet") >= 1, 20), tail(d)
    assert tree(outside) == before, "a claim went through the planted link"
    assert (d.inbox / "ward" / "second.dcm").read_bytes() == dicom(2)
    shutil.rmtree(d.inbox / ".dicomwatch")  # the operator's fix: the link goes, not its target
    assert wait_for(lambda: len(archived(d.archive)) == 2, 20), tail(d)
    assert d.stop() == 0
    assert tree(outside) == before


def test_a_planted_dead_node_linked_outside_is_left_alone(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    d = daemons()
    outside = outside_folder(tmp_path)
    before = tree(outside)
    claims = d.inbox / ".dicomwatch" / "claims"
    claims.mkdir(parents=True)
    (claims / "zzz.lock").touch()
    (claims / "zzz").symlink_to(outside)
    (d.inbox / "real.dcm").write_bytes(dicom(1))
    assert run_once(d) == 0, tail(d)
    assert tree(outside) == before, "the dead node's link was followed"
    assert archived_uids(d.archive) == [f"{UID}.1"]
    assert d.count_lines("zzz") >= 1, "the planted node is reported"
    assert (claims / "zzz").is_symlink()


def test_a_dead_nodes_claim_that_cannot_go_back_does_not_stop_the_start(
    daemons: Callable[..., DaemonProc],
) -> None:
    """``claims/zzz/foo/x.dcm`` where ``inbox/foo`` is a FIFO: that claim stays where it
    is (logged), the rest of the start goes on."""
    d = daemons()
    claims = d.inbox / ".dicomwatch" / "claims"
    (claims / "zzz" / "foo").mkdir(parents=True)
    (claims / "zzz.lock").touch()
    (claims / "zzz" / "foo" / "x.dcm").write_bytes(dicom(5))
    (claims / "zzz" / "y.dcm").write_bytes(dicom(6))
    os.mkfifo(d.inbox / "foo")
    assert run_once(d) == 0, tail(d)
    assert (claims / "zzz" / "foo" / "x.dcm").read_bytes() == dicom(5)
    assert archived_uids(d.archive) == [f"{UID}.6"]
    assert d.count_lines("cannot return") >= 1, tail(d)
    assert os.path.exists(d.inbox / "foo") and not (d.inbox / "foo").is_dir()


@pytest.mark.root
def test_a_dead_nodes_claims_on_another_mount_do_not_stop_the_start(
    daemons: Callable[..., DaemonProc],
) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a filesystem needs root and mount(8)")
    d = daemons()
    claims = d.inbox / ".dicomwatch" / "claims"
    (claims / "zzz").mkdir(parents=True)
    (claims / "zzz.lock").touch()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(claims / "zzz")],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (claims / "zzz" / "x.dcm").write_bytes(dicom(7))
        (d.inbox / "real.dcm").write_bytes(dicom(1))
        assert run_once(d) == 0, tail(d)
        assert archived_uids(d.archive) == [f"{UID}.1"]
        assert (claims / "zzz" / "x.dcm").read_bytes() == dicom(7)
        assert d.count_lines("cannot return") >= 1, tail(d)
    finally:
        if subprocess.run(["umount", str(claims / "zzz")], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(claims / "zzz")], check=False)


# ----- 3. a folder swapped for a symlink; the internal folder's owner --------------------


def test_swapping_a_folder_for_a_symlink_in_a_loop_never_moves_an_outside_file(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    """A sender writes ``sub/f<i>.dcm``, then swaps ``sub`` for a link to a folder
    holding files of the same names, again and again while the daemon claims."""
    d = daemons(settle_seconds=0.1, rescan_seconds=0.5)
    rounds = 40
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for i in range(rounds):
        (outside / f"f{i}.dcm").write_bytes(dicom(500 + i))
    before = tree(outside)
    d.start()
    rng = random.Random(15)
    sub = d.inbox / "sub"
    stop = threading.Event()

    def attack() -> None:
        for i in range(rounds):
            if stop.is_set():
                return
            sub.mkdir()
            (sub / f"f{i}.dcm").write_bytes(dicom(i))
            time.sleep(rng.uniform(0, 0.25))
            sub.rename(d.inbox / f".moved{i}")
            sub.symlink_to(outside)
            time.sleep(rng.uniform(0.1, 0.4))
            sub.unlink()

    thread = threading.Thread(target=attack, name="swapper")
    thread.start()
    try:
        thread.join(120)
    finally:
        stop.set()
        thread.join(10)
    (d.inbox / "barrier.dcm").write_bytes(dicom(9999))
    assert wait_for(lambda: f"{UID}.9999" in archived_uids(d.archive), 30), tail(d)
    assert d.stop() == 0
    assert tree(outside) == before, "an outside file was moved"
    taken = {f"{UID}.{500 + i}" for i in range(rounds)} & set(archived_uids(d.archive))
    assert not taken


@pytest.mark.parametrize("what", ["symlink", "file"])
def test_an_internal_folder_that_is_not_a_folder_is_refused(
    daemons: Callable[..., DaemonProc], tmp_path: Path, what: str
) -> None:
    d = daemons()
    elsewhere = tmp_path / "elsewhere-internal"
    (elsewhere / "claims" / "a").mkdir(parents=True)
    (elsewhere / "claims" / "a" / "x.dcm").write_bytes(dicom(3))
    before = tree(elsewhere)
    if what == "symlink":
        (d.inbox / ".dicomwatch").symlink_to(elsewhere)
    else:
        (d.inbox / ".dicomwatch").write_bytes(b"")
    (d.inbox / "real.dcm").write_bytes(dicom(1))
    assert run_once(d) == 78, tail(d)
    assert d.count_lines("is a symbolic link" if what == "symlink" else "not a folder") >= 1
    assert d.count_lines("Traceback") == 0, tail(d)
    assert tree(elsewhere) == before
    assert archived(d.archive) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_an_internal_folder_made_by_a_sender_is_refused(
    daemons: Callable[..., DaemonProc],
) -> None:
    d = daemons()
    (d.inbox / "x.dcm").write_bytes(dicom(1))
    assert run_once(d) == 0, tail(d)
    plant = d.inbox / ".dicomwatch"
    plant.rename(d.inbox / ".old")
    (plant / "claims" / "a").mkdir(parents=True)
    for p in (plant, plant / "claims", plant / "claims" / "a"):
        os.chown(p, 65534, 65534)
    (d.inbox / "y.dcm").write_bytes(dicom(2))
    assert run_once(d) == 78, tail(d)
    assert d.count_lines("belongs to uid 65534") >= 1, tail(d)
    assert (d.inbox / "y.dcm").read_bytes() == dicom(2)


# ----- 7. the same node_id twice ------------------------------------------------------------


def test_same_node_id_after_the_inbox_was_made_again_is_refused(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    a = daemons("a")
    a.start()
    shutil.rmtree(a.inbox)
    a.inbox.mkdir()
    twin = DaemonProc(tmp_path, "a2", node_id="a")
    try:
        twin.start(wait=False)
        assert twin.wait_exit(30) == 78, tail(twin)
        assert twin.count_lines("another dicomwatch with node_id 'a' is running") == 1
    finally:
        twin.ensure_stopped()
    (a.inbox / "x.dcm").write_bytes(dicom(1))
    assert wait_for(lambda: len(archived(a.archive)) == 1, 20), tail(a)
    assert a.stop() == 0


PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


class NamespacedDaemon(DaemonProc):
    """A daemon in a PID namespace of its own, where it is PID 1 (as in a container)."""

    def start(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "dicomwatch", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*PID_NAMESPACE, "--kill-child", *command, *args],
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
            )
        if wait:
            starts = self.starts
            assert wait_for(lambda: self.count_lines("with the ") >= starts, 30), tail(self)


def test_same_node_id_in_two_pid_namespaces_is_refused(tmp_path: Path) -> None:
    """Two containers, each daemon PID 1, sharing the archive, with one node_id."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("PID namespaces need root and util-linux unshare")
    probe = subprocess.run(
        [*PID_NAMESPACE, sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    shared = {"archive": tmp_path / "archive", "quarantine": tmp_path / "quarantine"}
    first = NamespacedDaemon(tmp_path, "one", node_id="a", inbox=tmp_path / "inbox1", **shared)
    second = NamespacedDaemon(tmp_path, "two", node_id="a", inbox=tmp_path / "inbox2", **shared)
    try:
        first.inbox.mkdir()
        second.inbox.mkdir()
        first.start()
        (first.inbox / "x.dcm").write_bytes(dicom(1))
        assert wait_for(lambda: len(archived(first.archive)) == 1, 20), tail(first)
        second.start(wait=False)
        assert second.wait_exit(30) == 78, tail(second)
        assert second.count_lines("another dicomwatch with node_id 'a' is running") == 1
        assert second.count_lines("Traceback") == 0, tail(second)
        assert first.proc is not None and first.proc.poll() is None
    finally:
        second.ensure_stopped()
        first.ensure_stopped()


# ----- 10. the inbox deleted or renamed under a running daemon ------------------------------


@pytest.mark.parametrize("how", ["renamed", "deleted"])
def test_an_inbox_made_again_is_watched_again_without_waiting_for_a_rescan(
    daemons: Callable[..., DaemonProc], tmp_path: Path, how: str
) -> None:
    d = daemons(rescan_seconds=600)
    d.start()
    (d.inbox / "before.dcm").write_bytes(dicom(1))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20), tail(d)
    if how == "renamed":
        d.inbox.rename(tmp_path / "inbox.old")
    else:
        shutil.rmtree(d.inbox)
    d.inbox.mkdir()
    (d.inbox / "ward").mkdir()
    (d.inbox / "ward" / "after.dcm").write_bytes(dicom(2))
    assert wait_for(lambda: len(archived(d.archive)) == 2, 10), tail(d)
    assert d.count_lines("watching the new one") == 1, tail(d)
    (d.inbox / "later.dcm").write_bytes(dicom(3))
    assert wait_for(lambda: len(archived(d.archive)) == 3, 10), tail(d)
    assert d.stop(signal.SIGTERM) == 0
    if how == "renamed":
        assert not [p for p in (tmp_path / "inbox.old").rglob("*.dcm")]
