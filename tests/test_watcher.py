"""InboxWatcher with real observers (inotify and polling) on real folders, and scan().

Synchronisation never relies on sleeps: tests poll ``drain()`` until the expected path
shows up or a deadline passes, and negative checks ("the temp name is never reported")
write a barrier file last and wait for it.  Both observers deliver events in order
(inotify) or in the same or a later snapshot (polling), so once the barrier is seen,
everything written before it has been reported.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from dicomwatch import watcher as watcher_mod
from dicomwatch.watcher import (
    DEFAULT_IGNORE,
    INTERNAL_DIR,
    InboxWatcher,
    ObserverKind,
    is_ignored,
    scan,
)

POLL = 0.05
DEADLINE = 10.0
OBSERVERS: list[ObserverKind] = ["native", "polling"]
ALL_MODES: list[ObserverKind] = ["auto", "native", "polling"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")


# -- helpers ---------------------------------------------------------------------------


class Seen:
    """Everything a watcher reported so far: file paths (with any close hint) and folders."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher = watcher
        self.files: dict[str, bool] = {}
        self.dirs: set[str] = set()
        self._barriers = itertools.count()

    def poll(self, timeout: float = 0.1) -> None:
        self.watcher.wait(timeout)
        for path, closed in self.watcher.drain():
            self.files[path] = self.files.get(path, False) or closed
        self.dirs.update(self.watcher.drain_dirs())

    def until(self, done: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; files={sorted(self.files)} "
                    f"dirs={sorted(self.dirs)}"
                )
            self.poll()

    def wait_for(self, *paths: Path | str) -> None:
        want = {str(p) for p in paths}
        self.until(lambda: want <= self.files.keys(), f"files {sorted(want)}")

    def wait_for_dir(self, path: Path | str) -> None:
        self.until(lambda: str(path) in self.dirs, f"folder {path}")

    def barrier(self, inbox: Path) -> None:
        """Write a fresh file and wait for it: all earlier events are in by then."""
        path = inbox / f"zz-barrier-{next(self._barriers)}.dcm"
        path.write_bytes(b"barrier")
        self.wait_for(path)
        del self.files[str(path)]


def write(path: Path, data: bytes = b"DICM" * 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def wait_until(done: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def start_watcher(inbox: Path) -> Iterator[Callable[..., InboxWatcher]]:
    """Start watchers on ``inbox``; stop them afterwards and check no thread is left."""
    threads_before = threading.active_count()
    started: list[InboxWatcher] = []

    def start(
        mode: ObserverKind, *, ignore: tuple[str, ...] = DEFAULT_IGNORE, **kw: int
    ) -> InboxWatcher:
        w = InboxWatcher(
            inbox,
            observer=mode,
            ignore=ignore,
            polling_interval_seconds=POLL,
            **kw,
        )
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
    assert threading.active_count() == threads_before, threading.enumerate()


@pytest.fixture(params=OBSERVERS)
def seen(request: pytest.FixtureRequest, start_watcher: Callable[..., InboxWatcher]) -> Seen:
    return Seen(start_watcher(request.param))


# -- events from real observers --------------------------------------------------------


def test_kind_reports_the_observer_in_use(start_watcher: Callable[..., InboxWatcher]) -> None:
    assert start_watcher("polling").kind == "polling"
    if sys.platform.startswith("linux"):
        assert start_watcher("native").kind == "inotify"
        assert start_watcher("auto").kind == "inotify"


def test_created_file_is_reported(seen: Seen, inbox: Path) -> None:
    path = write(inbox / "a.dcm")
    seen.wait_for(path)
    assert seen.watcher.events_seen >= 1
    assert all(p.startswith(str(inbox) + os.sep) for p in seen.files)


def test_temp_then_rename_reports_final_name_only(seen: Seen, inbox: Path) -> None:
    tmp = write(inbox / ".b.dcm.tmp")
    tmp.rename(inbox / "b.dcm")
    rsync_tmp = write(inbox / ".c.a1B2c3")  # rsync's ".<name>.XXXXXX"
    rsync_tmp.rename(inbox / "c")
    seen.wait_for(inbox / "b.dcm", inbox / "c")
    seen.barrier(inbox)
    assert set(seen.files) == {str(inbox / "b.dcm"), str(inbox / "c")}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_real_rsync_reports_final_names_only(seen: Seen, inbox: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write(src / "study" / f"im{i}.dcm", os.urandom(200_000))
    subprocess.run(["rsync", "-a", f"{src}/", f"{inbox}/"], check=True)
    want = {str(inbox / "study" / f"im{i}.dcm") for i in range(3)}
    seen.wait_for(*want)
    seen.barrier(inbox)
    assert set(seen.files) == want


def test_ignored_names_are_not_reported(seen: Seen, inbox: Path) -> None:
    for name in [".hidden.dcm", "a.part", "a.tmp", "a.partial", "a.dcm~"]:
        write(inbox / name)
    write(inbox / ".staging" / "x.dcm")  # any component counts
    write(inbox / "study" / ".x.dcm.tmp")
    write(inbox / INTERNAL_DIR / "claims" / "node1" / "y.dcm")
    seen.barrier(inbox)
    assert seen.files == {}
    assert not any(".staging" in d or INTERNAL_DIR in d for d in seen.dirs)


def test_internal_dir_is_never_reported_even_without_patterns(
    start_watcher: Callable[..., InboxWatcher], inbox: Path
) -> None:
    (inbox / INTERNAL_DIR).mkdir()
    for mode in OBSERVERS:
        seen = Seen(start_watcher(mode, ignore=()))
        write(inbox / INTERNAL_DIR / "claims" / mode / "x.dcm")
        hidden = write(inbox / f".{mode}-visible-without-patterns")
        seen.wait_for(hidden)
        seen.barrier(inbox)
        assert set(seen.files) == {str(hidden)}
        assert not any(INTERNAL_DIR in d for d in seen.dirs)


def test_file_in_a_new_subfolder(seen: Seen, inbox: Path) -> None:
    path = write(inbox / "p1" / "study" / "series" / "x.dcm")
    seen.wait_for(path)
    seen.wait_for_dir(inbox / "p1")


@linux_only
def test_quick_nested_mkdir_keeps_the_inotify_reader_alive(tmp_path: Path) -> None:
    """``mkdir -p`` races watchdog's recursive watch registration, which then warns from
    its reader thread; under ``-W error`` (this suite) that used to kill the thread in
    about one start in fifteen, and every later event was lost."""
    threads_before = threading.active_count()
    for trial in range(60):
        inbox = tmp_path / f"t{trial}"
        (inbox / "existing").mkdir(parents=True)
        with InboxWatcher(inbox, observer="native", ignore=()) as w:
            seen = Seen(w)
            path = write(inbox / "existing" / "new" / "deeper" / "x.dcm")
            seen.wait_for(path)
            assert w.alive
    assert threading.active_count() == threads_before


def test_folder_moved_in_gets_its_files_found(seen: Seen, inbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "study"
    files = [write(outside / "s1" / f"{i}.dcm") for i in range(3)] + [write(outside / "top.dcm")]
    moved = inbox / "study"
    outside.rename(moved)
    seen.wait_for_dir(moved)
    found = {path for path, kind in scan(inbox, DEFAULT_IGNORE, under=moved) if kind == "file"}
    expected = {str(moved / p.relative_to(outside)) for p in files}
    assert found == expected


def test_folder_renamed_from_a_hidden_staging_name(seen: Seen, inbox: Path) -> None:
    staging = inbox / ".incoming"
    write(staging / "a.dcm")
    staging.rename(inbox / "done")
    seen.wait_for_dir(inbox / "done")
    seen.barrier(inbox)
    assert not any(".incoming" in p for p in seen.files)


@linux_only
def test_close_write_hint_from_inotify(
    start_watcher: Callable[..., InboxWatcher], inbox: Path
) -> None:
    seen = Seen(start_watcher("native"))
    path = inbox / "closed.dcm"
    with path.open("wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        seen.wait_for(path)
    seen.until(lambda: seen.files[str(path)], "the close-write hint")


def test_polling_never_gives_a_close_hint(
    start_watcher: Callable[..., InboxWatcher], inbox: Path
) -> None:
    seen = Seen(start_watcher("polling"))
    path = write(inbox / "p.dcm")
    seen.wait_for(path)
    seen.barrier(inbox)
    assert seen.files[str(path)] is False


def test_odd_file_names(seen: Seen, inbox: Path) -> None:
    raw = b"bad\xff\xfe name\nwith newline.dcm"
    fd = os.open(os.path.join(os.fsencode(inbox), raw), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    os.close(fd)
    expected = os.fsdecode(os.path.join(os.fsencode(inbox), raw))
    seen.wait_for(expected)
    assert os.fsencode(expected) == os.path.join(os.fsencode(inbox), raw)


def test_symlinked_inbox_reports_paths_under_the_configured_name(
    start_watcher: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    """inotify would watch the link itself; the watcher watches the folder behind it."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for mode in OBSERVERS:
        w = InboxWatcher(link, observer=mode, ignore=DEFAULT_IGNORE, polling_interval_seconds=POLL)
        with w:
            assert w.inbox == link
            seen = Seen(w)
            write(real / f"{mode}.dcm")
            seen.wait_for(link / f"{mode}.dcm")
    assert {p for p, _ in scan(link, DEFAULT_IGNORE)} == {
        str(link / "native.dcm"),
        str(link / "polling.dcm"),
    }


def test_wait_blocks_until_something_is_queued(seen: Seen, inbox: Path) -> None:
    w = seen.watcher
    assert w.wait(0.01) is False
    write(inbox / "w.dcm")
    assert w.wait(DEADLINE) is True
    seen.wait_for(inbox / "w.dcm")
    assert w.queued == 0
    assert w.wait(0) is False


def test_drain_max_items(start_watcher: Callable[..., InboxWatcher], inbox: Path) -> None:
    w = start_watcher("polling")
    for i in range(5):
        write(inbox / f"{i}.dcm")
    wait_until(lambda: w.queued >= 5, "5 queued paths")
    first = w.drain(max_items=2)
    assert len(first) == 2
    assert w.wait(0) is True
    rest = w.drain()
    assert len(rest) == 3
    assert {p for p, _ in first + rest} == {str(inbox / f"{i}.dcm") for i in range(5)}
    assert w.drain(max_items=0) == []


@pytest.mark.parametrize("mode", OBSERVERS)
def test_queue_overflow_drops_and_flags(
    start_watcher: Callable[..., InboxWatcher], inbox: Path, mode: str
) -> None:
    w = start_watcher(mode, max_queued=5)
    for i in range(10):
        write(inbox / f"{i}.dcm")
    wait_until(lambda: w.events_dropped >= 5, "dropped events")
    assert w.overflow_suspected is True
    assert w.take_overflow() is True
    assert w.take_overflow() is False
    assert len(w.drain()) == 5


def test_high_water_mark_flags_without_dropping(
    start_watcher: Callable[..., InboxWatcher], inbox: Path
) -> None:
    w = start_watcher("polling", max_queued=100, high_water=3)
    for i in range(2):
        write(inbox / f"{i}.dcm")
    wait_until(lambda: w.queued == 2, "2 queued paths")
    assert w.take_overflow() is False
    write(inbox / "2.dcm")
    wait_until(lambda: w.queued == 3, "3 queued paths")
    assert w.take_overflow() is True
    assert w.events_dropped == 0


@pytest.mark.parametrize("mode", OBSERVERS)
def test_alive_until_the_inbox_disappears(
    start_watcher: Callable[..., InboxWatcher], inbox: Path, mode: str
) -> None:
    w = start_watcher(mode)
    assert w.alive is True
    shutil.rmtree(inbox)
    wait_until(lambda: not w.alive, "the watcher to notice the inbox is gone")


@pytest.mark.parametrize("mode", OBSERVERS)
def test_not_alive_once_the_inbox_is_renamed(
    start_watcher: Callable[..., InboxWatcher], inbox: Path, tmp_path: Path, mode: str
) -> None:
    """inotify keeps watching a renamed folder, and watchdog sends nothing for it: the
    watcher must still say it no longer watches the inbox, renamed or made again."""
    w = start_watcher(mode)
    assert w.alive is True and w.replaced is False
    inbox.rename(tmp_path / "inbox.old")
    assert w.alive is False and w.replaced is True
    inbox.mkdir()
    assert w.alive is False and w.replaced is True


def test_stop_is_idempotent_and_releases_threads(inbox: Path) -> None:
    before = threading.active_count()
    for mode in ALL_MODES:
        w = InboxWatcher(inbox, observer=mode, ignore=DEFAULT_IGNORE)
        w.stop()  # before start: nothing to do
        w.start()
        assert threading.active_count() > before
        with pytest.raises(RuntimeError):
            w.start()
        w.stop()
        w.stop()
        assert w.alive is False
        assert threading.active_count() == before, threading.enumerate()


def test_missing_inbox_raises(tmp_path: Path) -> None:
    before = threading.active_count()
    for mode in ALL_MODES:
        w = InboxWatcher(tmp_path / "nope", observer=mode, ignore=())
        with pytest.raises(FileNotFoundError):
            w.start()
        assert w.kind == "stopped"
    assert threading.active_count() == before


@linux_only
def test_auto_falls_back_to_polling_when_native_fails(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    start_watcher: Callable[..., InboxWatcher],
    inbox: Path,
) -> None:
    from watchdog.observers.inotify import InotifyObserver

    class NoWatchesLeft(InotifyObserver):
        """Starts its inotify reader thread, then fails like a full watch table."""

        def on_thread_start(self) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher_mod, "Observer", NoWatchesLeft)
    with caplog.at_level(logging.WARNING, logger="dicomwatch.watcher"):
        seen = Seen(start_watcher("auto"))
    assert seen.watcher.kind == "polling"
    assert any("falling back to polling" in r.getMessage() for r in caplog.records)
    path = write(inbox / "fallback.dcm")
    seen.wait_for(path)

    threads = threading.active_count()
    native = InboxWatcher(inbox, observer="native", ignore=DEFAULT_IGNORE)
    with pytest.raises(OSError, match="watch limit"):
        native.start()
    assert threading.active_count() == threads  # the inotify reader was joined


@pytest.mark.parametrize(
    "kwargs",
    [
        {"observer": "inotify"},
        {"polling_interval_seconds": 0},
        {"max_queued": 0},
        {"max_queued": 10, "high_water": 11},
        {"high_water": 0},
    ],
)
def test_invalid_arguments(inbox: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"observer": "auto", "ignore": DEFAULT_IGNORE, **kwargs}
    with pytest.raises(ValueError):
        InboxWatcher(inbox, **args)  # type: ignore[arg-type]


# -- the handler, fed synthetic events (deterministic corner cases) --------------------


@pytest.fixture
def unstarted(inbox: Path) -> InboxWatcher:
    return InboxWatcher(inbox, observer="polling", ignore=DEFAULT_IGNORE)


def feed(w: InboxWatcher, *events: FileSystemEvent) -> None:
    for event in events:
        w._handler.dispatch(event)


def test_handler_decodes_bytes_paths(unstarted: InboxWatcher, inbox: Path) -> None:
    raw = os.fsencode(inbox) + b"/caf\xe9.dcm"
    feed(unstarted, FileCreatedEvent(raw))
    assert unstarted.drain() == [(os.fsdecode(raw), False)]


def test_handler_uses_the_move_destination(
    unstarted: InboxWatcher, inbox: Path, tmp_path: Path
) -> None:
    feed(
        unstarted,
        FileMovedEvent(str(inbox / ".a.tmp"), str(inbox / "a.dcm")),
        FileMovedEvent(str(inbox / "b.dcm"), str(inbox / "b.dcm.part")),  # to an ignored name
        FileMovedEvent(str(inbox / "c.dcm"), str(tmp_path / "elsewhere.dcm")),  # moved out
        FileMovedEvent(str(inbox / "d.dcm"), ""),  # unmatched move-from
        DirMovedEvent(str(inbox / ".stage"), str(inbox / "study")),
        DirMovedEvent(str(tmp_path / "x"), str(inbox / INTERNAL_DIR / "x")),
    )
    assert unstarted.drain() == [(str(inbox / "a.dcm"), False)]
    assert unstarted.drain_dirs() == [str(inbox / "study")]


def test_handler_keeps_one_entry_per_path_with_the_latest_hint(
    unstarted: InboxWatcher, inbox: Path
) -> None:
    a, b = str(inbox / "a.dcm"), str(inbox / "b.dcm")
    feed(unstarted, FileCreatedEvent(a), FileCreatedEvent(b), FileModifiedEvent(a))
    feed(unstarted, FileClosedEvent(a))
    assert unstarted.drain() == [(a, True), (b, False)]
    feed(unstarted, FileClosedEvent(a), FileModifiedEvent(a))  # reopened after the close
    assert unstarted.drain() == [(a, False)]
    assert unstarted.events_seen == 6


def test_handler_ignores_events_that_announce_nothing(unstarted: InboxWatcher, inbox: Path) -> None:
    path = str(inbox / "a.dcm")
    feed(
        unstarted,
        FileOpenedEvent(path),
        FileClosedNoWriteEvent(path),  # e.g. the sorter reading the file
        FileDeletedEvent(path),
        DirCreatedEvent(str(inbox)),  # the inbox itself
    )
    assert unstarted.drain() == []
    assert unstarted.drain_dirs() == []
    assert unstarted.wait(0) is False


def test_handler_survives_a_broken_event(
    unstarted: InboxWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="dicomwatch.watcher"):
        feed(unstarted, FileCreatedEvent(None))  # type: ignore[arg-type]
    assert unstarted.take_overflow() is True
    assert "error while queueing" in caplog.text


# -- is_ignored ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "ignored"),
    [
        ("a.dcm", False),
        ("study/series/a.dcm", False),
        (".a.dcm", True),
        ("study/.staging/a.dcm", True),
        ("a.dcm.part", True),
        ("a.tmp", True),
        ("a.partial", True),
        ("a.dcm~", True),
        ("x.tmp/a.dcm", True),
        ("A.TMP", False),  # case-sensitive, like the shell on Linux
        ("line\nbreak.part", True),
        ("./a.dcm", False),
        ("", False),
    ],
)
def test_is_ignored(rel: str, ignored: bool) -> None:
    assert is_ignored(rel, DEFAULT_IGNORE) is ignored


def test_is_ignored_without_patterns() -> None:
    assert is_ignored(".hidden/a.tmp", ()) is False
    assert is_ignored("a.dcm", ["*.dcm"]) is True


# -- scan --------------------------------------------------------------------------------


def scanned(inbox: Path, **kw: Path) -> dict[str, str]:
    return dict(scan(inbox, DEFAULT_IGNORE, **kw))


def test_scan_finds_existing_files_recursively(inbox: Path) -> None:
    a = write(inbox / "a.dcm")
    b = write(inbox / "p1" / "study" / "b.dcm")
    c = write(inbox / "x.dcm" / "c.dcm")  # a folder that looks like a file
    (inbox / "empty").mkdir()
    write(inbox / INTERNAL_DIR / "claims" / "n" / "claimed.dcm")
    write(inbox / ".hidden.dcm")
    write(inbox / "p1" / "x.part")
    write(inbox / ".staging" / "d.dcm")
    write(inbox / "p1" / "sub.tmp" / "e.dcm")
    assert scanned(inbox) == {str(a): "file", str(b): "file", str(c): "file"}


def test_scan_returns_paths_under_the_given_inbox_name(inbox: Path) -> None:
    write(inbox / "a.dcm")
    rel = os.path.relpath(inbox)
    assert list(scan(rel, ())) == [(str(inbox / "a.dcm"), "file")]


def test_scan_reports_special_files_without_opening_them(inbox: Path, tmp_path: Path) -> None:
    outside_file = write(tmp_path / "outside.dcm")
    outside_dir = tmp_path / "outside_dir"
    write(outside_dir / "secret.dcm")
    (inbox / "link.dcm").symlink_to(outside_file)
    (inbox / "linkdir").symlink_to(outside_dir)
    (inbox / "loop").symlink_to(inbox)
    os.mkfifo(inbox / "x.dcm")  # opening it would block forever
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(inbox / "s.sock"))
    finally:
        sock.close()
    expected = {
        str(inbox / "link.dcm"): "symlink",
        str(inbox / "linkdir"): "symlink",
        str(inbox / "loop"): "symlink",
        str(inbox / "x.dcm"): "fifo",
        str(inbox / "s.sock"): "socket",
    }
    try:
        os.mknod(inbox / "null.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected[str(inbox / "null.dcm")] = "device"
    except PermissionError:
        pass  # no CAP_MKNOD here; the other kinds still prove the point

    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.update(scanned(inbox)), daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "scan blocked: it must have opened the FIFO"
    assert result == expected


def test_scan_handles_odd_names(inbox: Path) -> None:
    names = [b"bad\xff\xfe.dcm", b"new\nline.dcm", b"sp ace \t.dcm", "ünï.dcm".encode()]
    base = os.fsencode(inbox)
    for raw in names:
        fd = os.open(os.path.join(base, raw), os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    got = {os.fsencode(p) for p, kind in scan(inbox, DEFAULT_IGNORE) if kind == "file"}
    assert got == {os.path.join(base, raw) for raw in names}


def test_scan_skips_unreadable_subfolders(inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    ok = write(inbox / "ok" / "a.dcm")
    locked = inbox / "locked"
    hidden = write(locked / "b.dcm")
    locked.chmod(0)
    try:
        with caplog.at_level(logging.WARNING, logger="dicomwatch.watcher"):
            found = scanned(inbox)
    finally:
        locked.chmod(0o755)
    assert found[str(ok)] == "file"
    if os.geteuid() != 0:  # root reads through chmod 000
        assert str(hidden) not in found
        assert "unreadable" in caplog.text


def test_scan_tolerates_entries_vanishing_midway(inbox: Path) -> None:
    for i in range(20):
        write(inbox / f"d{i:02d}" / "a.dcm")
    it = scan(inbox, DEFAULT_IGNORE)
    first = next(it)
    for i in range(20):
        shutil.rmtree(inbox / f"d{i:02d}", ignore_errors=True)
    rest = list(it)
    assert first[1] == "file"
    assert rest == []  # lazy: the other folders were listed, then vanished, no error


def test_scan_never_follows_a_folder_swapped_for_a_symlink_mid_scan(
    inbox: Path, tmp_path: Path
) -> None:
    """``a`` is listed, then swapped for a link to an outside folder with a ``b`` of its
    own before ``a/b`` is entered: the scan must not list the outside ``b``."""
    outside = tmp_path / "outside"
    write(outside / "b" / "secret.dcm")
    first = write(inbox / "a" / "first.dcm")
    write(inbox / "a" / "b" / "inside.dcm")
    it = scan(inbox, DEFAULT_IGNORE)
    assert next(it) == (str(first), "file")  # ``a`` read; ``a/b`` waits to be entered
    (inbox / "a").rename(inbox / ".old")
    (inbox / "a").symlink_to(outside)
    rest = dict(it)
    assert str(inbox / "a" / "b" / "secret.dcm") not in rest
    assert rest == {}


def test_scan_does_not_enter_folders_nested_too_deep(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = inbox.joinpath(*(["d"] * watcher_mod.dirfd.MAX_DEPTH))
    ok = write(deep / "ok.dcm")
    write(deep / "d" / "too_deep.dcm")
    with caplog.at_level(logging.WARNING, logger="dicomwatch.watcher"):
        assert scanned(inbox) == {str(ok): "file"}
    assert caplog.text.count("folders deep") == 1


def test_scan_of_a_missing_inbox_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(scan(tmp_path / "nope", DEFAULT_IGNORE))


def test_scan_under_a_subfolder(inbox: Path, tmp_path: Path) -> None:
    a = write(inbox / "study" / "s1" / "a.dcm")
    write(inbox / "other" / "b.dcm")
    write(inbox / "study" / ".x.tmp")
    assert scanned(inbox, under=inbox / "study") == {str(a): "file"}
    assert scanned(inbox, under=inbox / "gone") == {}
    write(inbox / ".staging" / "c.dcm")
    write(inbox / INTERNAL_DIR / "d.dcm")
    assert scanned(inbox, under=inbox / ".staging") == {}
    assert scanned(inbox, under=inbox / INTERNAL_DIR) == {}
    (inbox / "linked").symlink_to(inbox / "other")
    assert scanned(inbox, under=inbox / "linked") == {}  # not followed
    with pytest.raises(ValueError):
        list(scan(inbox, DEFAULT_IGNORE, under=tmp_path))
