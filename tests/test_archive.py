"""Tests for dicomwatch.archive: durable, never-overwriting filing with real files.

Every guarantee is checked on the file system itself (bytes, names, counts), including
crash safety with a real process killed by SIGKILL and, when running as root, real
cross-device placement and a full disk on a small tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path, PurePosixPath

import pytest

from dicomwatch.archive import (
    INTERNAL_DIR,
    STAGING_DIR,
    TMP_SUFFIX,
    Filer,
    Placement,
    StagingOwner,
    clean_stale_staging,
)
from dicomwatch.errors import UnsafePathError

REPO = Path(__file__).resolve().parents[1]
REL = PurePosixPath("p1/20240101/ct_head/ax_5mm/CT.1.2.3.7.dcm")


# ----- helpers -------------------------------------------------------------------------


def temp_files(root: Path) -> list[Path]:
    """Every temporary file anywhere under ``root`` (hidden ones included)."""
    found: list[Path] = []
    for dirpath, _dirs, files in os.walk(root):
        found += [Path(dirpath) / name for name in files if name.endswith(TMP_SUFFIX)]
    return found


def regular_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` except the internal folder."""
    found: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != INTERNAL_DIR]
        found += [Path(dirpath) / name for name in files]
    return sorted(found)


def digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def poll_until(
    condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 30.0
) -> bool:
    """Poll ``condition``; False when the child ended first.  The sleep is only the
    polling interval, never the synchronisation itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0002)
    raise AssertionError("condition not reached in time")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs at ``path`` (root only); skip the test when that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not available")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "archive"
    path.mkdir()
    return path


@pytest.fixture
def owner(root: Path) -> Iterator[StagingOwner]:
    staging = StagingOwner(root, "test")
    yield staging
    staging.release()


@pytest.fixture
def filer(root: Path, owner: StagingOwner) -> Filer:
    return Filer(root, owner.path, fsync=True)


# ----- basic placement ----------------------------------------------------------------


def test_place_creates_folders_and_exact_bytes(root: Path, owner: StagingOwner) -> None:
    filer = Filer(root, owner.path)
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk of the comparison
    placed = filer.place(REL, data)
    assert placed == Placement(root / REL, duplicate=False, same_uid_differs=False, renamed=False)
    assert (root / REL).read_bytes() == data
    assert regular_files(root) == [root / REL]
    assert temp_files(root) == []
    assert os.listdir(owner.path) == []


def test_place_without_fsync_is_still_complete(root: Path, owner: StagingOwner) -> None:
    filer = Filer(root, owner.path, fsync=False)
    placed = filer.place(PurePosixPath("x.dcm"), b"abc")
    assert placed.path == root / "x.dcm"
    assert placed.path.read_bytes() == b"abc"
    assert temp_files(root) == []


def test_empty_payload(filer: Filer, root: Path) -> None:
    placed = filer.place(PurePosixPath("a/empty.dcm"), b"")
    assert placed.path.read_bytes() == b""
    again = filer.place(PurePosixPath("a/empty.dcm"), b"")
    assert again.duplicate
    other = filer.place(PurePosixPath("a/empty.dcm"), b"x")
    assert other.path == root / "a" / "empty~1.dcm"


def test_same_bytes_twice_is_a_duplicate(filer: Filer, root: Path) -> None:
    data = b"DICM" * 1000
    first = filer.place(REL, data)
    second = filer.place(REL, data)
    assert not first.duplicate
    assert second == Placement(root / REL, duplicate=True, same_uid_differs=False, renamed=False)
    assert regular_files(root) == [root / REL]
    assert (root / REL).read_bytes() == data
    assert temp_files(root) == []


def test_different_bytes_get_numbered_names(filer: Filer, root: Path) -> None:
    a, b, c = b"first" * 100, b"second" * 100, b"third" * 100
    pa = filer.place(REL, a)
    pb = filer.place(REL, b)
    pc = filer.place(REL, c)
    folder = root / REL.parent
    assert pa.path == folder / "CT.1.2.3.7.dcm"
    assert pb.path == folder / "CT.1.2.3.7~1.dcm"
    assert pc.path == folder / "CT.1.2.3.7~2.dcm"
    assert (pa.renamed, pb.renamed, pc.renamed) == (False, True, True)
    assert not (pa.duplicate or pb.duplicate or pc.duplicate)
    assert pa.path.read_bytes() == a
    assert pb.path.read_bytes() == b
    assert pc.path.read_bytes() == c
    assert sorted(os.listdir(folder)) == ["CT.1.2.3.7.dcm", "CT.1.2.3.7~1.dcm", "CT.1.2.3.7~2.dcm"]
    assert temp_files(root) == []


def test_refiling_a_numbered_file_is_a_duplicate(filer: Filer, root: Path) -> None:
    """After a crash between filing and deleting the inbox file, the same bytes come
    again: they must map to the ``~1`` file already there, not make a ``~2``."""
    a, b = b"original", b"conflicting"
    filer.place(REL, a)
    first = filer.place(REL, b)
    again = filer.place(REL, b)
    assert again == Placement(first.path, duplicate=True, same_uid_differs=False, renamed=True)
    assert len(os.listdir(root / REL.parent)) == 2
    # a fresh Filer (a restarted process) sees the same thing
    fresh = Filer(root, filer.staging)
    assert fresh.place(REL, b).path == first.path
    assert fresh.place(REL, a) == Placement(root / REL, True, False, False)
    assert len(os.listdir(root / REL.parent)) == 2


def test_same_uid_with_other_content_is_reported(filer: Filer, root: Path) -> None:
    uids: dict[Path, str] = {}

    def uid_of(path: Path) -> str | None:
        return uids.get(path)

    filer.place(REL, b"version one")
    uids[root / REL] = "1.2.3"
    placed = filer.place(REL, b"version two", uid="1.2.3", uid_of=uid_of)
    assert placed.same_uid_differs
    assert placed.renamed
    assert placed.path == root / REL.parent / "CT.1.2.3.7~1.dcm"
    assert (root / REL).read_bytes() == b"version one"


def test_other_uid_is_not_a_conflict(filer: Filer, root: Path) -> None:
    asked: list[Path] = []

    def uid_of(path: Path) -> str | None:
        asked.append(path)
        return "9.9.9"

    filer.place(REL, b"version one")
    placed = filer.place(REL, b"version two", uid="1.2.3", uid_of=uid_of)
    assert asked == [root / REL]
    assert not placed.same_uid_differs
    assert placed.renamed
    # without a uid nothing is asked and nothing reported
    third = filer.place(REL, b"version three", uid=None, uid_of=uid_of)
    assert asked == [root / REL]
    assert not third.same_uid_differs


def test_never_overwrites_an_existing_file(filer: Filer, root: Path) -> None:
    target = root / REL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"precious, not ours")
    before = target.stat()
    placed = filer.place(REL, b"new data")
    assert placed.path != target
    assert placed.renamed
    assert target.read_bytes() == b"precious, not ours"
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_nlink,
    )
    assert placed.path.read_bytes() == b"new data"


def test_a_folder_in_the_way_gets_a_numbered_name(filer: Filer, root: Path) -> None:
    (root / "a" / "x.dcm").mkdir(parents=True)
    placed = filer.place(PurePosixPath("a/x.dcm"), b"data")
    assert placed.path == root / "a" / "x~1.dcm"
    assert placed.path.read_bytes() == b"data"
    assert (root / "a" / "x.dcm").is_dir()


def test_folder_removed_after_first_use_is_made_again(filer: Filer, root: Path) -> None:
    """The Filer remembers folders it made; someone tidying the archive must not make
    the next placement fail."""
    filer.place(PurePosixPath("a/b/one.dcm"), b"1")
    shutil.rmtree(root / "a")
    placed = filer.place(PurePosixPath("a/b/two.dcm"), b"2")
    assert placed.path.read_bytes() == b"2"
    assert temp_files(root) == []


# ----- staying inside the root ---------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    ["../escape.dcm", "a/../../escape.dcm", "a/..", "..", "/abs/escape.dcm", "."],
)
def test_dot_dot_and_absolute_are_refused(
    filer: Filer, root: Path, tmp_path: Path, rel: str
) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafePathError):
        filer.place(PurePosixPath(rel), b"data")
    with pytest.raises(UnsafePathError):
        filer.write_once(PurePosixPath(rel), b"data")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("link_at", ["link", "a/link"])
def test_symlinked_folder_pointing_outside_is_refused(
    filer: Filer, root: Path, tmp_path: Path, link_at: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / link_at
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        filer.place(PurePosixPath(link_at) / "b" / "x.dcm", b"data")
    with pytest.raises(UnsafePathError):
        filer.write_once(PurePosixPath(link_at) / "x.json", b"{}")
    assert list(outside.iterdir()) == []
    assert temp_files(tmp_path) == []


def test_symlinked_file_name_pointing_outside_is_refused(
    filer: Filer, root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    (root / "x.dcm").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        filer.place(PurePosixPath("x.dcm"), b"data")
    assert victim.read_bytes() == b"do not touch"


def test_symlink_staying_inside_the_root_is_allowed(filer: Filer, root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    placed = filer.place(PurePosixPath("alias/x.dcm"), b"data")
    assert (root / "real" / "x.dcm").read_bytes() == b"data"
    assert placed.path.read_bytes() == b"data"


# ----- write_once ----------------------------------------------------------------------


def test_write_once_writes_once(filer: Filer, root: Path) -> None:
    rel = PurePosixPath("q/x.dcm.reason.json")
    first = filer.write_once(rel, b'{"reason": "truncated"}')
    assert first == root / rel
    assert first.read_bytes() == b'{"reason": "truncated"}'
    second = filer.write_once(rel, b'{"reason": "other"}')
    assert second == first
    assert first.read_bytes() == b'{"reason": "truncated"}'
    assert regular_files(root) == [first]
    assert temp_files(root) == []


def test_write_once_leaves_a_foreign_file_alone(filer: Filer, root: Path) -> None:
    target = root / "note.json"
    target.write_bytes(b"someone else's")
    assert filer.write_once(PurePosixPath("note.json"), b"ours") == target
    assert target.read_bytes() == b"someone else's"
    assert temp_files(root) == []


# ----- fsync ---------------------------------------------------------------------------


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records what os.fsync is called on; the real fsync still runs."""
    calls: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_fsync_of_file_and_folders(root: Path, owner: StagingOwner, fsynced: list[str]) -> None:
    filer = Filer(root, owner.path, fsync=True)
    placed = filer.place(PurePosixPath("a/b/x.dcm"), b"data")
    files = [c for c in fsynced if c.endswith(TMP_SUFFIX)]
    assert len(files) == 1
    assert Path(files[0]).parent == owner.path
    # the parent of every folder created on the way, the file's data, and then the
    # folder that received the new name (after the data, never before)
    assert fsynced == [str(root), str(root / "a"), files[0], str(root / "a" / "b")]

    fsynced.clear()
    filer.place(PurePosixPath("a/b/y.dcm"), b"more")
    assert len([c for c in fsynced if c.endswith(TMP_SUFFIX)]) == 1
    assert fsynced[-1] == str(root / "a" / "b")
    assert str(root) not in fsynced  # folders already made are not synced again
    assert placed.path.read_bytes() == b"data"

    fsynced.clear()
    dup = filer.place(PurePosixPath("a/b/y.dcm"), b"more")
    assert dup.duplicate
    assert fsynced[-1] == str(root / "a" / "b")  # a name from a crashed run is made durable

    fsynced.clear()
    filer.write_once(PurePosixPath("c/n.json"), b"{}")
    assert len([c for c in fsynced if c.endswith(TMP_SUFFIX)]) == 1
    assert fsynced[-1] == str(root / "c")


def test_no_fsync_when_disabled(root: Path, owner: StagingOwner, fsynced: list[str]) -> None:
    filer = Filer(root, owner.path, fsync=False)
    filer.place(PurePosixPath("a/b/x.dcm"), b"data")
    filer.place(PurePosixPath("a/b/x.dcm"), b"other")
    filer.write_once(PurePosixPath("a/n.json"), b"{}")
    assert fsynced == []


# ----- staging ownership ---------------------------------------------------------------


def staging_base(root: Path) -> Path:
    return root / INTERNAL_DIR / STAGING_DIR


def test_staging_owner_layout_and_release(root: Path) -> None:
    owner = StagingOwner(root, "node.run.1")
    assert owner.path == staging_base(root) / "node.run.1"
    assert owner.path.is_dir()
    assert owner.lock_path == staging_base(root) / "node.run.1.lock"
    assert owner.lock_path.is_file()
    owner.release()
    assert not owner.path.exists()
    assert not owner.lock_path.exists()


def test_same_owner_name_twice_in_one_process_is_refused(root: Path) -> None:
    first = StagingOwner(root, "dup")
    try:
        with pytest.raises(RuntimeError, match="in use"):
            StagingOwner(root, "dup")
        assert first.path.is_dir()  # the refused second owner did not disturb the first
    finally:
        first.release()
    again = StagingOwner(root, "dup")
    again.release()


def test_clean_stale_staging_on_missing_root(tmp_path: Path) -> None:
    assert clean_stale_staging(tmp_path / "nothing") == 0
    assert clean_stale_staging(tmp_path) == 0


def test_live_owner_in_this_process_is_not_cleaned(root: Path, owner: StagingOwner) -> None:
    (owner.path / f".a{TMP_SUFFIX}").write_bytes(b"in progress")
    assert clean_stale_staging(root) == 0
    assert (owner.path / f".a{TMP_SUFFIX}").read_bytes() == b"in progress"


def test_stale_folder_with_free_lock_is_cleaned(root: Path) -> None:
    base = staging_base(root)
    (base / "dead.host.7").mkdir(parents=True)
    (base / "dead.host.7.lock").touch()
    for i in range(3):
        (base / "dead.host.7" / f".{i}{TMP_SUFFIX}").write_bytes(b"x" * i)
    assert clean_stale_staging(root) == 3
    assert os.listdir(base) == []
    assert clean_stale_staging(root) == 0


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dicomwatch.archive import StagingOwner
    owner = StagingOwner(Path(sys.argv[1]), sys.argv[2])
    (owner.path / ".busy.dwtmp").write_bytes(b"half written")
    print("ready", flush=True)
    sys.stdin.read()  # hold the lock until the parent closes our stdin (or kills us)
    """
)


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_owner_in_another_process(root: Path, ending: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), "other.run.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == "ready\n"
            folder = staging_base(root) / "other.run.1"
            # alive: its folder is left alone and its name cannot be taken
            assert clean_stale_staging(root) == 0
            assert (folder / ".busy.dwtmp").read_bytes() == b"half written"
            with pytest.raises(RuntimeError):
                StagingOwner(root, "other.run.1")
            assert (folder / ".busy.dwtmp").is_file()
            # a different name is independent
            mine = StagingOwner(root, "mine")
            assert clean_stale_staging(root) == 0
            if ending == "exit":
                proc.stdin.close()
                assert proc.wait(timeout=30) == 0
            else:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    # dead: its folder and lock go, ours stays
    assert clean_stale_staging(root) == 1
    assert not folder.exists()
    assert not (staging_base(root) / "other.run.1.lock").exists()
    assert mine.path.is_dir()
    taken = StagingOwner(root, "other.run.1")
    taken.release()
    mine.release()
    assert os.listdir(staging_base(root)) == []


def test_owner_whose_lock_file_was_replaced_keeps_a_visible_lock(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner may remove a free lock file between our open() and our flock(); the
    owner must then not hold a lock on a deleted file (its folder would be unprotected
    and invisible to later clean-ups)."""
    real_flock = fcntl.flock
    lock_path = staging_base(root) / "racy.lock"
    raced: list[bool] = []

    def flock_after_cleaner(fd: int, op: int) -> None:
        if not raced:
            raced.append(True)
            assert clean_stale_staging(root) == 0  # the cleaner wins the race
            assert not lock_path.exists()
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_cleaner)
    owner = StagingOwner(root, "racy")
    monkeypatch.undo()
    try:
        assert raced
        assert lock_path.exists()
        assert os.stat(lock_path).st_ino == os.fstat(owner._fd).st_ino
        assert owner.path.is_dir()
        with pytest.raises(RuntimeError):
            StagingOwner(root, "racy")
        assert clean_stale_staging(root) == 0
        assert owner.path.is_dir()
    finally:
        owner.release()


def test_cleaner_does_not_remove_a_folder_re_owned_meanwhile(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleaner opens a stale lock file; before it locks it, the owner name is taken
    again with a new lock file.  The new owner's folder must survive."""
    base = staging_base(root)
    base.mkdir(parents=True)
    (base / "again").mkdir()
    (base / "again.lock").touch()
    real_flock = fcntl.flock
    owners: list[StagingOwner] = []

    def flock_after_new_owner(fd: int, op: int) -> None:
        if not owners:
            # the old owner's release and a new owner, between the cleaner's open and flock
            shutil.rmtree(base / "again")
            (base / "again.lock").unlink()
            monkeypatch.setattr(fcntl, "flock", real_flock)
            owners.append(StagingOwner(root, "again"))
            (owners[0].path / f".new{TMP_SUFFIX}").write_bytes(b"being written")
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_new_owner)
    try:
        assert clean_stale_staging(root) == 0
        assert (owners[0].path / f".new{TMP_SUFFIX}").read_bytes() == b"being written"
        assert owners[0].lock_path.exists()
    finally:
        for owner in owners:
            owner.release()


# ----- crash safety --------------------------------------------------------------------

PLACER = textwrap.dedent(
    """
    import sys
    from pathlib import Path, PurePosixPath
    from dicomwatch.archive import Filer, StagingOwner
    root, payload, rel = Path(sys.argv[1]), Path(sys.argv[2]), PurePosixPath(sys.argv[3])
    data = payload.read_bytes()
    owner = StagingOwner(root, "crash")
    filer = Filer(root, owner.path, fsync=True)
    print("ready", flush=True)
    filer.place(rel, data)
    print("done", flush=True)
    sys.stdin.read()  # never exits on its own: every run ends with SIGKILL
    """
)


def has_temp(staging: Path, minimum: int, final: Path | None = None) -> bool:
    """A temporary file of at least ``minimum`` bytes is in ``staging`` (or the write is
    already over: ``final`` exists)."""
    if final is not None and final.exists():
        return True
    for name in os.listdir(staging):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(staging / name).st_size >= minimum:
                return True
    return False


PHASES = ("ready", "temp_created", "temp_partial", "linked", "done")


def test_sigkill_during_placement_never_leaves_a_partial_file(tmp_path: Path) -> None:
    rng = random.Random(0xD1C0)
    size = 50 * 1024 * 1024
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(rng.randbytes(size))
    expected = digest_of(payload_file)
    root = tmp_path / "archive"
    root.mkdir()
    staging = staging_base(root) / "crash"
    phases = list(PHASES) * 2
    rng.shuffle(phases)
    outcomes: list[tuple[str, bool, int]] = []
    filed: set[Path] = set()

    for i, phase in enumerate(phases):
        rel = PurePosixPath(f"p/{i}/CT.{i}.dcm")
        final = root / rel
        with subprocess.Popen(
            [sys.executable, "-c", PLACER, str(root), str(payload_file), str(rel)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                assert proc.stdout.readline() == "ready\n"
                if phase == "temp_created":
                    poll_until(partial(has_temp, staging, 0), proc)
                elif phase == "temp_partial":
                    minimum = int(size * rng.uniform(0.05, 0.95))
                    poll_until(partial(has_temp, staging, minimum, final), proc)
                elif phase == "linked":
                    poll_until(final.exists, proc)
                elif phase == "done":
                    assert proc.stdout.readline() == "done\n"
                assert proc.poll() is None, "the placing process ended by itself"
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()

        # the final name holds the whole payload or does not exist
        existed = final.exists()
        if existed:
            assert final.stat().st_size == size
            assert digest_of(final) == expected
            filed.add(final)
        assert set(regular_files(root)) == filed
        # temporaries live only in the staging folder, and clean-up finds all of them
        leftovers = sorted(os.listdir(staging))
        assert all(name.endswith(TMP_SUFFIX) for name in leftovers)
        assert {p.parent for p in temp_files(root)} <= {staging}
        assert clean_stale_staging(root) == len(leftovers)
        assert temp_files(root) == []
        assert not staging.exists()
        outcomes.append((phase, existed, len(leftovers)))

        # the owner name is free again and filing resumes where it stopped
        owner = StagingOwner(root, "crash")
        try:
            redo = Filer(root, owner.path, fsync=False).place(rel, payload_file.read_bytes())
        finally:
            owner.release()
        assert redo.path == final
        assert redo.duplicate == existed
        assert digest_of(final) == expected
        filed.add(final)
        assert set(regular_files(root)) == filed
        assert temp_files(root) == []

    # the kills did land mid-write and after publication, not only at the edges
    assert any(left > 0 for _, _, left in outcomes), outcomes
    assert any(not exists for _, exists, _ in outcomes), outcomes
    assert any(exists for _, exists, _ in outcomes), outcomes
    assert all(exists for phase, exists, _ in outcomes if phase in ("linked", "done"))
    assert not any(exists for phase, exists, _ in outcomes if phase == "ready")


# ----- other file systems (root only: real mounts) -------------------------------------


@pytest.mark.root
def test_placement_into_a_mount_inside_the_root(filer: Filer, root: Path) -> None:
    """The staging folder is on another file system than the destination: os.link
    fails with EXDEV and the temporary file is written beside the destination."""
    with tmpfs(root / "mnt", "4m") as mnt:
        assert os.stat(mnt).st_dev != os.stat(filer.staging).st_dev
        rel = PurePosixPath("mnt/a/b/x.dcm")
        data = os.urandom(200_000)
        placed = filer.place(rel, data)
        assert placed == Placement(mnt / "a/b/x.dcm", False, False, False)
        assert placed.path.read_bytes() == data
        assert filer.place(rel, data) == Placement(placed.path, True, False, False)
        other = filer.place(rel, b"other")
        assert other.path == mnt / "a/b/x~1.dcm"
        assert other.path.read_bytes() == b"other"
        assert placed.path.read_bytes() == data
        sidecar = filer.write_once(PurePosixPath("mnt/a/b/x.dcm.reason.json"), b"{}")
        assert sidecar.read_bytes() == b"{}"
        assert filer.write_once(PurePosixPath("mnt/a/b/x.dcm.reason.json"), b"[]") == sidecar
        assert sidecar.read_bytes() == b"{}"
        assert temp_files(root) == []
        assert sorted(os.listdir(mnt / "a/b")) == ["x.dcm", "x.dcm.reason.json", "x~1.dcm"]


@pytest.mark.root
def test_disk_full_leaves_nothing_behind(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64k") as root:
        owner = StagingOwner(root, "full")
        try:
            filer = Filer(root, owner.path, fsync=True)
            filler = root / "filler.bin"
            filler.write_bytes(b"\0" * 40 * 1024)
            data = os.urandom(40 * 1024)
            rel = PurePosixPath("a/b/x.dcm")
            with pytest.raises(OSError) as info:
                filer.place(rel, data)
            assert info.value.errno == errno.ENOSPC
            assert not (root / rel).exists()
            assert not (root / "a/b/x~1.dcm").exists()
            assert temp_files(root) == []
            assert os.listdir(owner.path) == []
            with pytest.raises(OSError) as info:
                filer.write_once(PurePosixPath("a/b/big.json"), data)
            assert info.value.errno == errno.ENOSPC
            assert not (root / "a/b/big.json").exists()
            assert temp_files(root) == []

            filler.unlink()
            placed = filer.place(rel, data)
            assert placed == Placement(root / rel, False, False, False)
            assert placed.path.read_bytes() == data
            assert temp_files(root) == []
        finally:
            owner.release()
