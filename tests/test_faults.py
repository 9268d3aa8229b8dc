"""Faults ``dicomwatch run`` and ``dicomwatch sort`` must ride out without losing a file.

A transient condition of the environment (archive disk full, permission denied, a file
that vanishes or is still being written) must leave the file in the inbox (or in the
daemon's claims folder inside it, which counts as the inbox), be retried with back-off,
be logged once per file and state change rather than once per retry, and never stop the
daemon.  Each test causes the real condition instead of mocking it: a small tmpfs that
really fills up, a daemon that really runs as an unprivileged user so that permission
bits apply (root ignores them), files really deleted, truncated or swapped under the
daemon.  Tests that need root (mounting, dropping privileges) are marked ``root`` and
skip with the reason when the machine does not allow them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import build_dataset, wait_for
from daemon_helpers import DaemonProc, archived, archived_uids, inbox_files, temporaries
from pydicom import dcmread

from dicomwatch.layout import clean_component

TEMPLATE = "{PatientID}/{SOPInstanceUID}.dcm"
PATIENT_DIR = clean_component("PID001")
"""The folder every test instance is filed under with ``TEMPLATE``."""
UID_PREFIX = "1.2.826.0.1.3680043.8.498.91."


# ----- files and logs ------------------------------------------------------------------


def uid(i: int) -> str:
    return f"{UID_PREFIX}{i}"


def dicom_bytes(i: int, *, rows: int = 8, columns: int = 8) -> bytes:
    """A complete instance with a predictable UID; 256x256 is about 128 KB."""
    ds = build_dataset(rows=rows, columns=columns, seed=i, SOPInstanceUID=uid(i), InstanceNumber=i)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def drop(folder: Path, name: str, data: bytes, *, mode: int | None = None) -> Path:
    """Deliver a file; with ``mode``, under an ignored temporary name first and renamed
    once its mode is set, so the daemon never sees it with any other mode."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if mode is None:
        path.write_bytes(data)
        return path
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.rename(tmp, path)
    return path


def named(d: DaemonProc, name: str) -> list[dict[str, Any]]:
    """Result records of the inbox file called ``name`` (names are unique per test)."""
    return [r for r in d.files() if Path(r["source"]).name == name]


def outcomes(d: DaemonProc, name: str) -> list[str]:
    return [r["outcome"] for r in named(d, name)]


def lines_mentioning(log_path: Path, name: str) -> int:
    """Log lines that name the file (a record may name it twice: source and message)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if name in line)


def located(inbox: Path, name: str) -> list[Path]:
    """Where ``name`` is in the inbox: its own place or the daemon's claims folder."""
    return [p for p in inbox_files(inbox) if p.name == name]


def failed_attempts(d: DaemonProc, name: str) -> int:
    """N from "<source> filed after N failed attempts": how often it was really tried."""
    for rec in d.records():
        m = re.fullmatch(r"(.*) filed after (\d+) failed attempts", str(rec.get("msg", "")))
        if m and Path(m.group(1)).name == name:
            return int(m.group(2))
    return 0


def holds_for(predicate: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    """True if ``predicate`` stays true for the whole period (an invariant, not a wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return predicate()


def tail(d: DaemonProc) -> str:
    """The end of a daemon's log, for assertion messages."""
    return d.log_path.read_text(errors="replace")[-3000:]


def alive(d: DaemonProc) -> bool:
    return d.proc is not None and d.proc.poll() is None


def quarantined(quarantine: Path) -> list[Path]:
    if not quarantine.exists():
        return []
    return sorted(
        p
        for p in quarantine.rglob("*")
        if p.is_file() and ".dicomwatch" not in p.parts and not p.name.endswith(".reason.json")
    )


def summaries(d: DaemonProc) -> list[str]:
    return [str(r["msg"]) for r in d.records() if str(r.get("msg", "")).startswith("summary:")]


# ----- daemons, mounts, an unprivileged user ---------------------------------------------


class Daemons:
    """Makes daemons for one test and stops every one of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[DaemonProc] = []

    def __call__(self, name: str = "a", **overrides: Any) -> DaemonProc:
        overrides.setdefault("template", TEMPLATE)
        d = DaemonProc(self.root, name, **overrides)
        self.made.append(d)
        return d

    def add(self, d: DaemonProc) -> DaemonProc:
        self.made.append(d)
        return d

    def stop_all(self) -> None:
        for d in self.made:
            d.ensure_stopped()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(tmp_path)
    yield made
    made.stop_all()


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture
def mount_tmpfs(daemons: Daemons) -> Iterator[Callable[..., Path]]:
    """``mount_tmpfs(folder, size)`` mounts a tmpfs there; unmounted after the test.

    Depends on ``daemons`` so that its teardown runs first: daemons are stopped before
    the unmount, since a running daemon holds files open on the mount.
    """
    mounted: list[Path] = []

    def mount(where: Path, size: str = "2m", *, read_only: bool = False) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("cannot mount a filesystem here: not running as root")
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a filesystem here: no mount command")
        options = f"size={size},mode=0755" + (",ro" if read_only else "")
        result = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where))
        if result.returncode != 0:
            pytest.skip(f"cannot mount a filesystem here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    daemons.stop_all()
    for where in reversed(mounted):
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def fill_up(path: Path, *, leave: int) -> int:
    """Fill the filesystem holding ``path`` with one file, then give back ``leave`` bytes.

    Returns the bytes free afterwards.  Filling to ENOSPC first makes the result exact
    whatever else is on the filesystem.
    """
    chunk = b"\0" * (256 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    continue
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave))
    finally:
        os.close(fd)
    return shutil.disk_usage(path.parent).free


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    python: str
    """An interpreter this user can run, with dicomwatch and its dependencies importable."""

    def prefix(self) -> list[str]:
        """Run a command as this user, with no supplementary groups (root's are dropped)."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
        ]


def _test_user() -> pwd.struct_passwd:
    """A dedicated system user ``dwtest`` (made once, idempotent), else ``nobody``."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("dwtest")
    if shutil.which("useradd") is not None:
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "dwtest")
        with contextlib.suppress(KeyError):
            return pwd.getpwnam("dwtest")
    return pwd.getpwnam("nobody")


_PROBE = """
import multiprocessing, os, dicomwatch.sorter
ctx = multiprocessing.get_context("forkserver")
child = ctx.Process(target=os.getpid)
child.start()
child.join(30)
assert child.exitcode == 0, child.exitcode
print(os.geteuid())
"""


def _probe(prefix: list[str], python: str, uid: int) -> str | None:
    """None if ``python`` runs as the user and can start a worker process, else why not.

    Starting a worker matters: the fork server execs the interpreter again, as the
    user, without the capabilities ``setpriv`` still had when it exec'd the first one.
    """
    result = subprocess.run(
        [*prefix, python, "-c", _PROBE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd="/",
    )
    if result.returncode == 0 and result.stdout.strip() == str(uid):
        return None
    return f"{python}: {(result.stderr.strip() or result.stdout.strip())[-300:]}"


def _helper_venv(folder: Path) -> str | None:
    """A venv on the system interpreter of the same version that sees the test venv's
    packages, for when the test interpreter sits below a folder only root may enter
    (pyenv under a 0700 /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None or os.path.realpath(system) == os.path.realpath(sys.executable):
        return None
    made = _run(system, "-m", "venv", "--without-pip", str(folder))
    if made.returncode != 0:
        return None
    site_packages = Path(sysconfig.get_paths(vars={"base": str(folder)})["purelib"])
    site_packages.mkdir(parents=True, exist_ok=True)
    (site_packages / "dicomwatch-tests.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    return str(folder / "bin" / "python")


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[User]:
    """A user the daemon can run as so that file permissions apply to it."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("no way to drop privileges here: util-linux setpriv is not installed")
    try:
        entry = _test_user()
    except KeyError:
        pytest.skip("no unprivileged user to run as (neither dwtest nor nobody exists)")
    prefix = User(entry.pw_name, entry.pw_uid, entry.pw_gid, "").prefix()
    helper = Path(tempfile.mkdtemp(prefix="dicomwatch-venv-"))
    try:
        helper.chmod(0o755)
        why = _probe(prefix, sys.executable, entry.pw_uid)
        python = sys.executable
        if why is not None:
            python = _helper_venv(helper / "venv") or ""
            again = _probe(prefix, python, entry.pw_uid) if python else "no system python"
            if again is not None:
                pytest.skip(f"cannot run dicomwatch as {entry.pw_name}: {why}; {again}")
        yield User(entry.pw_name, entry.pw_uid, entry.pw_gid, python)
    finally:
        shutil.rmtree(helper, ignore_errors=True)


@pytest.fixture
def ubase(unprivileged: User) -> Iterator[Path]:
    """A folder the unprivileged user can reach (pytest's tmp_path sits below a 0700 one)."""
    base = Path(tempfile.mkdtemp(prefix="dicomwatch-faults-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)  # root: modes left read-only do not matter


def chown_tree(path: Path, user: User) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid, follow_symlinks=False)


class UnprivilegedDaemon(DaemonProc):
    """A ``DaemonProc`` whose process runs as ``user``; its folders are given to that user."""

    def __init__(self, root: Path, name: str = "a", *, user: User, **overrides: Any) -> None:
        overrides.setdefault("template", TEMPLATE)
        super().__init__(root, name, **overrides)
        self.user = user
        for folder in (self.inbox, self.archive, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
            chown_tree(folder, user)

    def start(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """``DaemonProc.start`` with the command run through ``setpriv``."""
        self.starts += 1
        command = [self.user.python, "-m", "dicomwatch", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.user.prefix(), *command, *args],
                stdout=log,
                stderr=log,
                env={**os.environ, "HOME": str(self.root), **(env or {})},
            )
        if wait and "--once" not in args:
            starts = self.starts
            assert wait_for(
                lambda: (
                    self.count_lines("dicomwatch starting") >= starts
                    and self.count_lines("with the ") >= starts
                ),
                30,
            ), self.log_path.read_text()


@pytest.fixture
def udaemons(ubase: Path, unprivileged: User, daemons: Daemons) -> Callable[..., DaemonProc]:
    def make(name: str = "a", **overrides: Any) -> DaemonProc:
        return daemons.add(UnprivilegedDaemon(ubase, name, user=unprivileged, **overrides))

    return make


# ----- 1. archive disk full ------------------------------------------------------------


@pytest.mark.root
def test_disk_full_keeps_files_logs_once_and_files_all_when_space_returns(
    daemons: Daemons, mount_tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    """Big files that do not fit wait in the inbox with one ``disk_full`` line each, however
    often they are retried; a small one that fits is filed meanwhile; no partial or
    temporary file is left in the archive; once space returns, everything is filed."""
    archive = mount_tmpfs(tmp_path / "archive", "2m")
    d = daemons(archive=archive)
    d.start()
    filler = archive / "filler.bin"
    free = fill_up(filler, leave=64 * 1024)
    big = {f"big{i}.dcm": dicom_bytes(i, rows=256, columns=256) for i in range(3)}
    small = dicom_bytes(50)
    assert len(small) < free < min(len(b) for b in big.values()), (len(small), free)
    for name, data in big.items():
        drop(d.inbox, name, data)
    drop(d.inbox, "small.dcm", small)

    assert wait_for(
        lambda: (
            outcomes(d, "small.dcm") == ["sorted"]
            and all(outcomes(d, n) == ["failed"] for n in big)
        ),
        30,
    ), tail(d)
    for name in big:
        (record,) = named(d, name)
        assert record["reason"] == "disk_full" and record["retryable"] is True
        assert "No space left on device" in record["message"]

    def steady() -> bool:
        return (
            alive(d)
            and all(outcomes(d, n) == ["failed"] for n in big)
            and all(lines_mentioning(d.log_path, n) == 1 for n in big)
            and all(len(located(d.inbox, n)) == 1 for n in big)
            and archived_uids(archive) == [uid(50)]
        )

    # Several retries happen in this window (back-off 0.2, 0.4, 0.8, 1.0 s); the count
    # is checked from the "filed after N failed attempts" line below.
    assert holds_for(steady, 3.5), tail(d)
    # A failed attempt removes its staging file; a leaked one would persist (and eat space).
    assert wait_for(lambda: temporaries(archive) == [], 5), temporaries(archive)
    on_disk = [p for p in archive.rglob("*") if p.is_file() and ".dicomwatch" not in p.parts]
    assert sorted(p.name for p in on_disk) == sorted(["filler.bin", f"{uid(50)}.dcm"])
    assert archived(archive)[0].read_bytes() == small, "nothing partial under a final name"

    filler.unlink()
    assert wait_for(lambda: len(archived(archive)) == 4, 30), tail(d)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert alive(d)
    assert d.stop() == 0
    assert archived_uids(archive) == sorted([uid(50), *(uid(i) for i in range(3))])
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in archived(archive)}
    for i, (name, data) in enumerate(big.items()):
        assert by_uid[uid(i)].read_bytes() == data
        assert outcomes(d, name) == ["failed", "sorted"]
        assert failed_attempts(d, name) >= 3, "retried several times, logged once"
    assert temporaries(archive, d.quarantine) == []
    assert quarantined(d.quarantine) == []


# ----- 2. permissions (the daemon runs as an unprivileged user) -------------------------


@pytest.mark.root
def test_unreadable_inbox_file_is_kept_logged_once_and_filed_once_readable(
    udaemons: Callable[..., DaemonProc],
) -> None:
    """A root-owned file with mode 000: claimed, kept, one ``permission_denied`` line
    however often it is retried, filed once it is made readable; others flow meanwhile."""
    d = udaemons()
    d.start()
    data = dicom_bytes(1)
    drop(d.inbox, "locked.dcm", data, mode=0o000)  # owned by root: the daemon cannot read it
    drop(d.inbox, "open.dcm", dicom_bytes(2))
    assert wait_for(
        lambda: outcomes(d, "locked.dcm") == ["failed"] and outcomes(d, "open.dcm") == ["sorted"],
        30,
    ), tail(d)
    (record,) = named(d, "locked.dcm")
    assert record["reason"] == "permission_denied" and "Permission denied" in record["message"]
    assert holds_for(
        lambda: (
            alive(d)
            and lines_mentioning(d.log_path, "locked.dcm") == 1
            and len(located(d.inbox, "locked.dcm")) == 1
        ),
        2.5,
    ), tail(d)

    (where,) = located(d.inbox, "locked.dcm")  # it stays claimed while it is retried
    where.chmod(0o644)
    assert wait_for(lambda: uid(1) in archived_uids(d.archive), 20), tail(d)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert d.stop() == 0
    assert outcomes(d, "locked.dcm") == ["failed", "sorted"]
    assert failed_attempts(d, "locked.dcm") >= 2
    assert archived_uids(d.archive) == [uid(1), uid(2)]
    assert quarantined(d.quarantine) == []


@pytest.mark.root
@pytest.mark.parametrize("read_only", ["destination_folder", "archive_root"])
def test_read_only_archive_keeps_files_logs_once_and_files_after_repair(
    udaemons: Callable[..., DaemonProc], read_only: str
) -> None:
    """The destination folder (mode 555), or the whole archive made read-only while the
    daemon runs: files wait in the inbox with one ``permission_denied`` line each."""
    d = udaemons()
    locked = d.archive / PATIENT_DIR if read_only == "destination_folder" else d.archive
    locked.mkdir(exist_ok=True)
    owner = os.stat(d.archive)
    os.chown(locked, owner.st_uid, owner.st_gid)
    if read_only == "destination_folder":
        locked.chmod(0o555)
    d.start()
    if read_only == "archive_root":
        locked.chmod(0o555)  # after start: the daemon's staging folder already exists
    names = {f"ro{i}.dcm": dicom_bytes(10 + i) for i in range(3)}
    try:
        for name, data in names.items():
            drop(d.inbox, name, data)
        assert wait_for(lambda: all(outcomes(d, n) == ["failed"] for n in names), 30), tail(d)
        for name in names:
            (record,) = named(d, name)
            assert record["reason"] == "permission_denied", record
            assert "Permission denied" in record["message"]
        assert holds_for(
            lambda: (
                alive(d)
                and all(lines_mentioning(d.log_path, n) == 1 for n in names)
                and all(len(located(d.inbox, n)) == 1 for n in names)
            ),
            2.5,
        ), tail(d)
        assert archived(d.archive) == []
        assert wait_for(lambda: temporaries(d.archive) == [], 5), temporaries(d.archive)
    finally:
        locked.chmod(0o755)
    assert wait_for(lambda: len(archived(d.archive)) == 3, 20), tail(d)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert d.stop() == 0
    assert archived_uids(d.archive) == sorted(uid(10 + i) for i in range(3))
    for name in names:
        assert outcomes(d, name) == ["failed", "sorted"]
    assert quarantined(d.quarantine) == []


@pytest.mark.root
def test_quarantine_removed_while_running_loses_nothing(
    udaemons: Callable[..., DaemonProc],
) -> None:
    """Someone deletes the whole quarantine, staging folder included, while the daemon
    runs.  The next bad file is never lost: either it is quarantined at once (the folders
    are remade) or it waits in the inbox, logged once, while good files are still filed,
    and is quarantined once the daemon is restarted."""
    d = udaemons()
    owner = os.stat(d.inbox)
    os.chown(d.root, owner.st_uid, owner.st_gid)  # the service may remake its folders
    d.start()
    drop(d.inbox, "bad1.dcm", b"not a dicom file")
    assert wait_for(lambda: outcomes(d, "bad1.dcm") == ["quarantined"], 20)
    shutil.rmtree(d.quarantine)
    bad = b"not a dicom file either"
    drop(d.inbox, "bad2.dcm", bad)
    drop(d.inbox, "good.dcm", dicom_bytes(3))
    assert wait_for(lambda: outcomes(d, "good.dcm") == ["sorted"], 20)
    assert wait_for(lambda: bool(outcomes(d, "bad2.dcm")), 20), tail(d)
    if outcomes(d, "bad2.dcm") == ["failed"]:
        assert holds_for(
            lambda: (
                alive(d)
                and lines_mentioning(d.log_path, "bad2.dcm") == 1
                and [p.read_bytes() for p in located(d.inbox, "bad2.dcm")] == [bad]
            ),
            2.0,
        ), tail(d)
        drop(d.inbox, "good2.dcm", dicom_bytes(4))
        assert wait_for(lambda: outcomes(d, "good2.dcm") == ["sorted"], 20)
        assert d.stop() == 0
        assert [p.read_bytes() for p in located(d.inbox, "bad2.dcm")] == [bad]
        d.start()
    assert wait_for(lambda: outcomes(d, "bad2.dcm")[-1:] == ["quarantined"], 20), tail(d)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert d.stop() == 0
    (kept,) = quarantined(d.quarantine)
    assert kept.read_bytes() == bad
    assert kept.with_name(kept.name + ".reason.json").is_file()
    assert temporaries(d.archive, d.quarantine) == []
    assert len(archived(d.archive)) == len(set(archived_uids(d.archive))) >= 2


# ----- 3. files that vanish ---------------------------------------------------------------


def test_files_deleted_while_settling_are_forgotten_quietly(daemons: Daemons) -> None:
    """Files deleted at staggered moments around their settle time: each is either filed
    whole (it was claimed first) or never mentioned; nothing fails, nothing is quarantined."""
    d = daemons(settle_seconds=0.3)
    d.start()
    gone = {f"gone{i}.dcm": dicom_bytes(20 + i) for i in range(12)}
    kept = {f"kept{i}.dcm": dicom_bytes(40 + i) for i in range(4)}
    for name, data in {**gone, **kept}.items():
        drop(d.inbox, name, data)
    deleted = set()
    for name in gone:  # one every 40 ms: before, around and after their settle time
        with contextlib.suppress(FileNotFoundError):
            (d.inbox / name).unlink()
            deleted.add(name)
        time.sleep(0.04)
    assert wait_for(lambda: all(outcomes(d, n) == ["sorted"] for n in kept), 20)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert holds_for(lambda: alive(d), 1.0)
    assert d.stop() == 0
    assert deleted, "at least one file was deleted before the daemon took it"
    assert not any(r["outcome"] == "failed" for r in d.files())
    for name in gone:
        if name in deleted:
            assert lines_mentioning(d.log_path, name) == 0, name
        else:
            assert outcomes(d, name) == ["sorted"], name
    expected = {uid(40 + i) for i in range(4)} | {
        uid(20 + i) for i, n in enumerate(gone) if n not in deleted
    }
    assert set(archived_uids(d.archive)) == expected
    assert quarantined(d.quarantine) == []


def test_claimed_file_deleted_before_it_is_read(daemons: Daemons) -> None:
    """A file removed from the claims folder after the claim, before a worker reads it:
    no failure record, no retries (the status goes back to ``failing 0``), nothing
    quarantined, and the daemon files the next file."""
    psutil = pytest.importorskip("psutil")
    d = daemons(workers=1, summary_seconds=0.5)
    d.start()
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)

    def workers() -> list[Any]:
        found = []
        for child in proc.children():
            with contextlib.suppress(psutil.Error):
                if "forkserver" in " ".join(child.cmdline()):
                    found += [w for w in child.children() if w.status() != psutil.STATUS_ZOMBIE]
        return found

    assert wait_for(lambda: len(workers()) == 1, 20)
    (worker,) = workers()
    worker.send_signal(signal.SIGSTOP)  # the task is sent but not read until SIGCONT
    try:
        drop(d.inbox, "gone.dcm", dicom_bytes(60))
        claim = d.inbox / ".dicomwatch" / "claims" / "a" / "gone.dcm"
        assert wait_for(claim.exists, 20), tail(d)
        claim.unlink()
        drop(d.inbox, "next.dcm", dicom_bytes(61))
        assert wait_for(lambda: located(d.inbox, "next.dcm")[:1] != [d.inbox / "next.dcm"], 20)
    finally:
        worker.send_signal(signal.SIGCONT)
    assert wait_for(lambda: outcomes(d, "next.dcm") == ["sorted"], 20), tail(d)
    seen = len(summaries(d))
    assert wait_for(lambda: len(summaries(d)) >= seen + 3, 10)
    assert all(", failing 0," in s for s in summaries(d)[seen:]), summaries(d)[seen:]
    assert alive(d)
    assert d.stop() == 0
    assert outcomes(d, "gone.dcm") == []
    assert lines_mentioning(d.log_path, "gone.dcm") <= 1
    assert archived_uids(d.archive) == [uid(61)]
    assert quarantined(d.quarantine) == []
    assert inbox_files(d.inbox) == []


# ----- 4. files still being written, truncated or swapped ---------------------------------


def _append_in_chunks(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """A sender that reopens the file for every chunk (``cat >>`` in a loop, some SMB
    clients): each chunk ends with a close, which inotify reports as close-write."""
    step = -(-len(data) // chunks)
    for offset in range(0, len(data), step):
        with path.open("ab") as fh:
            fh.write(data[offset : offset + step])
        time.sleep(pause)


@pytest.mark.parametrize("reopen", [False, True], ids=["one_open", "reopen_per_chunk"])
def test_growing_file_with_short_pauses_is_filed_whole(daemons: Daemons, reopen: bool) -> None:
    """Pauses shorter than settle_seconds: the file is filed once, complete."""
    d = daemons(settle_seconds=1.0)
    d.start()
    data = dicom_bytes(70, rows=256, columns=256)
    path = d.inbox / "growing.dcm"
    if reopen:
        _append_in_chunks(path, data, chunks=6, pause=0.5)
    else:
        with path.open("wb") as fh:
            step = -(-len(data) // 6)
            for offset in range(0, len(data), step):
                fh.write(data[offset : offset + step])
                fh.flush()
                time.sleep(0.5)
    assert wait_for(
        lambda: bool(named(d, "growing.dcm")) and not located(d.inbox, "growing.dcm"), 20
    )
    assert d.stop() == 0
    assert outcomes(d, "growing.dcm") == ["sorted"], d.files()
    (filed,) = archived(d.archive)
    assert filed.read_bytes() == data
    assert quarantined(d.quarantine) == []


def test_partial_file_that_settles_is_quarantined_and_never_merged(daemons: Daemons) -> None:
    """A sender stalls longer than settle_seconds: the partial file is quarantined as
    ``truncated``, not archived.  What arrives later at the same name is a new file:
    the tail alone is quarantined on its own; a full re-send is filed."""
    d = daemons(settle_seconds=0.3)
    d.start()
    data = dicom_bytes(80, rows=128, columns=128)
    cut = len(data) * 2 // 3
    head, tail = data[:cut], data[cut:]
    drop(d.inbox, "part.dcm", head)
    assert wait_for(lambda: outcomes(d, "part.dcm") == ["quarantined"], 20)
    (record,) = named(d, "part.dcm")
    assert record["reason"] == "truncated", record

    with (d.inbox / "part.dcm").open("ab") as fh:  # the sender resumes: appends the rest
        fh.write(tail)
    assert wait_for(lambda: len(outcomes(d, "part.dcm")) == 2, 20)
    assert outcomes(d, "part.dcm")[1] == "quarantined"

    drop(d.inbox, "part.dcm", data)  # the sender starts over
    assert wait_for(lambda: len(outcomes(d, "part.dcm")) == 3, 20)
    assert wait_for(lambda: inbox_files(d.inbox) == [], 10)
    assert d.stop() == 0
    assert outcomes(d, "part.dcm")[2] == "sorted"
    (filed,) = archived(d.archive)
    assert filed.read_bytes() == data
    kept = sorted(p.read_bytes() for p in quarantined(d.quarantine))
    assert kept == sorted([head, tail]), "each piece kept as it arrived, never joined"
    assert (d.quarantine / "truncated" / "part.dcm").read_bytes() == head


def test_file_swapped_by_rename_while_settling_files_final_content(daemons: Daemons) -> None:
    """Editor-style save (write a temp file, rename it over the name) while the daemon is
    settling the first version: only the final content is filed, even though both
    versions have the same size and modification time.  A later swap after filing is a
    new delivery and is filed too."""
    d = daemons(settle_seconds=1.0)
    d.start()
    first, final = dicom_bytes(90), dicom_bytes(91)
    assert len(first) == len(final)
    path = drop(d.inbox, "swap.dcm", first)
    st = path.stat()
    tmp = d.inbox / "swap.dcm.tmp"  # an ignored name
    tmp.write_bytes(final)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, path)
    assert wait_for(lambda: len(archived(d.archive)) == 1 and not located(d.inbox, "swap.dcm"), 20)
    assert holds_for(lambda: len(d.files()) == 1, 1.5)
    (filed,) = archived(d.archive)
    assert filed.read_bytes() == final

    later = dicom_bytes(92)
    tmp.write_bytes(later)
    os.rename(tmp, path)
    assert wait_for(lambda: len(archived(d.archive)) == 2, 20)
    assert d.stop() == 0
    assert archived_uids(d.archive) == [uid(91), uid(92)]
    assert outcomes(d, "swap.dcm") == ["sorted", "sorted"]


# ----- 5. dicomwatch sort into a read-only archive ------------------------------------------


def _sort_as(
    user: User, base: Path, sources: dict[str, bytes], archive: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    src = base / "src"
    src.mkdir()
    for name, data in sources.items():
        (src / name).write_bytes(data)
    chown_tree(src, user)  # --move could delete them: untouched by choice, not by mode
    quarantine = base / "quarantine"
    quarantine.mkdir()
    chown_tree(quarantine, user)
    config = base / "sort.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "archive": str(archive),
                "quarantine": str(quarantine),
                "inbox": str(base / "inbox"),
                "template": TEMPLATE,
                "workers": 2,
                "log_format": "json",
            }
        )
    )
    result = subprocess.run(
        [
            *user.prefix(),
            user.python,
            "-m",
            "dicomwatch",
            "sort",
            "--no-progress",
            "--move",
            "--config",
            str(config),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=base,
        env={**os.environ, "HOME": str(base)},
    )
    return result, src


def _file_records(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == "file":
                out.append(rec)
    return out


@pytest.mark.root
def test_sort_move_into_read_only_archive_tree_fails_each_file_once_and_keeps_sources(
    unprivileged: User, ubase: Path
) -> None:
    """The archive root is writable but the folder the files belong in is not: exit 1,
    one ``permission_denied`` record per file, every source still there byte for byte."""
    archive = ubase / "archive"
    (archive / PATIENT_DIR).mkdir(parents=True)
    chown_tree(archive, unprivileged)
    (archive / PATIENT_DIR).chmod(0o555)
    sources = {f"s{i}.dcm": dicom_bytes(100 + i) for i in range(4)}
    result, src = _sort_as(unprivileged, ubase, sources, archive)
    assert result.returncode == 1, result.stderr[-3000:]
    records = _file_records(result.stderr)
    assert sorted(Path(r["source"]).name for r in records) == sorted(sources), records
    for rec in records:
        assert rec["outcome"] == "failed" and rec["reason"] == "permission_denied", rec
        assert "Permission denied" in rec["message"]
    assert "failed 4" in result.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == sources
    assert archived(archive) == []
    assert temporaries(archive, ubase / "quarantine") == []
    assert quarantined(ubase / "quarantine") == []


@pytest.mark.root
def test_sort_into_read_only_archive_root_is_refused_before_any_file(
    unprivileged: User, ubase: Path
) -> None:
    """An archive this user cannot write at all is a set-up error, reported once with
    exit 78 (EX_CONFIG) before any file is touched, rather than once per file."""
    archive = ubase / "archive"
    archive.mkdir()
    chown_tree(archive, unprivileged)
    archive.chmod(0o555)
    sources = {f"s{i}.dcm": dicom_bytes(110 + i) for i in range(3)}
    result, src = _sort_as(unprivileged, ubase, sources, archive)
    assert result.returncode == 78, result.stderr[-3000:]
    assert "is not writable by this user" in result.stderr
    assert _file_records(result.stderr) == []
    assert {p.name: p.read_bytes() for p in src.iterdir()} == sources
    assert list(archive.iterdir()) == []


@pytest.mark.root
def test_sort_move_into_read_only_mount_fails_each_file_once_and_keeps_sources(
    mount_tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    """A read-only filesystem mounted inside the archive (EROFS, which binds root too):
    exit 1, one ``read_only`` record per file, sources untouched."""
    archive = tmp_path / "archive"
    mount_tmpfs(archive / PATIENT_DIR, "1m", read_only=True)
    src = tmp_path / "src"
    sources = {f"m{i}.dcm": dicom_bytes(120 + i) for i in range(3)}
    for name, data in sources.items():
        drop(src, name, data)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomwatch",
            "sort",
            "--no-progress",
            "--move",
            "--log-format",
            "json",
            "--archive",
            str(archive),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    records = _file_records(result.stderr)
    assert sorted(Path(r["source"]).name for r in records) == sorted(sources), records
    for rec in records:
        assert rec["outcome"] == "failed" and rec["reason"] == "read_only", rec
        assert "Read-only file system" in rec["message"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == sources
    assert archived(archive) == []
    assert temporaries(archive) == []


# ----- sender folders the daemon may not empty -------------------------------------------


def _shipped_inbox_acl() -> str:
    """The default ACL that systemd/dicomwatch.tmpfiles.conf puts on the inbox."""
    tmpfiles = Path(__file__).resolve().parent.parent / "systemd" / "dicomwatch.tmpfiles.conf"
    for line in tmpfiles.read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["a+", "/srv/dicomwatch/inbox"]:
            return fields[6]
    raise AssertionError("no ACL line for the inbox in the tmpfiles file")


def _sender_drops(inbox: Path, user: User, files: dict[str, bytes]) -> Path:
    """Another user, in the daemon's group, with umask 022 makes a study folder and fills it."""
    study = inbox / "study1"
    script = "import os, sys, pathlib\nos.umask(0o022)\nd = pathlib.Path(sys.argv[1])\nd.mkdir()\n"
    for name in files:
        script += f"(d / {name!r}).write_bytes(bytes.fromhex({files[name].hex()!r}))\n"
    sender = ["setpriv", "--reuid=64123", "--regid=64123", f"--groups={user.gid}"]
    code = subprocess.run(
        [*sender, user.python, "-I", "-c", script, str(study)],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert code.returncode == 0, code.stderr
    return study


@pytest.mark.parametrize("with_acl", [False, True], ids=["no_acl", "shipped_acl"])
def test_sender_folder_made_with_umask_022(
    udaemons: Callable[..., DaemonProc], unprivileged: User, with_acl: bool
) -> None:
    """The README's rule for sender folders, checked as the service sees them: without
    the inbox's default ACL a sender's umask-022 folder cannot be emptied, and the files
    show as stuck (they stayed invisible before, ``failing 0, pending 0``); with the ACL
    the tmpfiles file ships, they are filed."""
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl (Debian package acl) is not installed")
    d = udaemons(summary_seconds=0.5, stuck_warning_seconds=1.0, rescan_seconds=1.0)
    d.inbox.chmod(0o2770)
    if with_acl:
        acl = _shipped_inbox_acl().replace(":dicomwatch:", f":{unprivileged.gid}:")
        _run("setfacl", "-m", acl, str(d.inbox))
    files = {f"{i}.dcm": dicom_bytes(i) for i in range(2)}
    study = _sender_drops(d.inbox, unprivileged, files)
    d.start()
    if with_acl:
        assert wait_for(lambda: len(archived(d.archive)) == 2, 30), d.log_path.read_text()
        assert not any(study.iterdir())
    else:
        assert wait_for(
            lambda: any("stuck 2 (oldest" in str(r.get("msg")) for r in d.records()), 30
        ), d.log_path.read_text()
        assert wait_for(lambda: d.count_lines("group-writable") == 2, 30)
        assert sorted(p.name for p in study.iterdir()) == sorted(files)
        assert archived(d.archive) == []
    assert d.stop() == 0
