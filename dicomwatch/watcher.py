"""Notice files arriving in the inbox, cheaply and with bounded memory.

Two sources feed the daemon, and neither is trusted alone:

* :class:`InboxWatcher` turns watchdog notifications into a bounded, de-duplicated queue
  of paths.  It is fast, but events get lost: the kernel drops them when its queue
  overflows, network shares deliver none for remote writers, and the observer can die.
* :func:`scan` walks the inbox.  It is slow but complete, so the daemon runs it at
  start-up, periodically, after :meth:`InboxWatcher.take_overflow` says events were
  lost, and for every directory reported by :meth:`InboxWatcher.drain_dirs`.

Either way a path only means "look at this"; whether the file is complete is decided by
:class:`dicomwatch.settle.SettleTracker`.

Paths are ``str``.  Names that are not valid UTF-8 carry surrogate escapes (the
``os.fsdecode`` convention), so ``os.fsencode(path)`` always gives back the exact bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import logging
import os
import re
import stat
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from dicomwatch import dirfd
from dicomwatch.config import DEFAULT_IGNORE, INTERNAL_DIR, ObserverKind
from dicomwatch.settle import special_kind

__all__ = [
    "DEFAULT_IGNORE",
    "DEFAULT_MAX_QUEUED",
    "INTERNAL_DIR",
    "InboxWatcher",
    "ObserverKind",
    "is_ignored",
    "scan",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 100_000
"""Distinct paths (plus directories) held between two drains before events are dropped."""

# Only the events that can mean "a file may have arrived".  On inotify this also narrows
# the kernel mask: no IN_OPEN / IN_CLOSE_NOWRITE / IN_DELETE traffic, which the sorter's
# own reads and removals would otherwise generate for every file.  FileAttribEvent must be
# listed explicitly: watchdog filters by event class, and ``touch``/``utime`` after the
# last write (``scp -p``, ``cp -p``) arrives as an attrib event.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


@functools.lru_cache(maxsize=64)
def _compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for all patterns, so checking a name costs one match, not one per pattern.

    ``fnmatch.translate`` matches case-sensitively here (like the shell on Linux) and
    lets ``*`` match newlines, which file names may contain.
    """
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _split(rel_path: str) -> list[str]:
    if os.altsep:
        rel_path = rel_path.replace(os.altsep, os.sep)
    return [part for part in rel_path.split(os.sep) if part and part != "."]


def is_ignored(rel_path: str, patterns: Sequence[str]) -> bool:
    """True if any component of ``rel_path`` (relative to the inbox) matches a pattern.

    Matching components rather than the whole path means ``.*`` hides a file inside a
    hidden folder too (``.incoming/x.dcm``): senders that stage a whole folder under a
    temporary name rename it when done, and only then should its files be looked at.
    """
    regex = _compile_patterns(tuple(patterns))
    if regex is None:
        return False
    return any(regex.match(part) for part in _split(rel_path))


def _is_internal(rel_path: str) -> bool:
    return rel_path == INTERNAL_DIR or rel_path.startswith(INTERNAL_DIR + os.sep)


def scan(
    inbox: str | os.PathLike[str],
    patterns: Sequence[str],
    *,
    under: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """Walk the inbox and yield ``(path, kind)`` for everything that is not a directory.

    ``kind`` is ``"file"`` for regular files, else ``"symlink"``, ``"fifo"``,
    ``"socket"``, ``"device"`` (or ``"other"``), so the caller can log special files
    instead of silently skipping them.  Special files are never opened (opening a FIFO
    blocks forever) and symlinks are never followed, not even to directories: a link to
    ``/`` must not make the daemon file the whole machine.  Nor is a folder that was
    swapped for a symlink after it was listed: every folder is opened relative to its
    parent with ``O_NOFOLLOW`` (:mod:`dicomwatch.dirfd`), never by its path string.
    Folders more than :data:`~dicomwatch.dirfd.MAX_DEPTH` levels down are not entered.

    Streaming on purpose: entries are yielded while each directory is being read, and
    only the not-yet-visited sub-directory paths are held in memory, so a flat inbox
    with a million files costs no more memory than an empty one.

    Paths are ``os.path.abspath(inbox)`` joined with the relative path, exactly as
    :class:`InboxWatcher` reports them, so a scan and an event name the same file with
    the same string (the settle tracker and the daemon key on it).
    ``under`` restricts the walk to one directory inside the inbox (a directory reported
    by :meth:`InboxWatcher.drain_dirs`); it is not resolved, so a symlink there is not
    followed.

    Names matching ``patterns`` and the top-level :data:`INTERNAL_DIR` are skipped,
    including everything below them.  Entries that vanish mid-scan are skipped
    silently; unreadable sub-directories are logged and skipped.  Only an inbox that
    cannot be read at all raises (``FileNotFoundError``, ``PermissionError``...): that is
    a configuration or mount problem the caller must hear about.  A vanished or
    unreadable ``under`` yields nothing.
    """
    root = os.path.abspath(inbox)
    start: tuple[str, ...] = ()
    if under is not None:
        rel = os.path.relpath(os.path.abspath(under), root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            raise ValueError(f"{os.fspath(under)!r} is not inside the inbox {root!r}")
        if rel != os.curdir:
            if _is_internal(rel) or is_ignored(rel, patterns):
                return
            start = tuple(_split(rel))
    try:
        # Only the inbox itself may be a symlink: it is configured that way.
        root_fd = _open_dir(root, follow=True)
    except OSError:
        if under is None:
            raise
        return
    try:
        for parts, kind in walk_at(root_fd, patterns, label=root, start=start, top_internal=True):
            yield os.path.join(root, *parts), kind
    finally:
        os.close(root_fd)


def walk_at(
    root_fd: int,
    patterns: Sequence[str] = (),
    *,
    label: str,
    start: tuple[str, ...] = (),
    top_internal: bool = False,
) -> Iterator[tuple[tuple[str, ...], str]]:
    """:func:`scan` below the open folder ``root_fd``: yields ``(parts, kind)``.

    ``parts`` are the path components below ``root_fd``.  Each folder is reached by
    :func:`~dicomwatch.dirfd.open_below` from ``root_fd``, so nothing is followed even
    if a folder is swapped for a symlink during the walk.  ``label`` names ``root_fd``
    in log messages; ``top_internal`` skips :data:`INTERNAL_DIR` at the top level.
    """
    regex = _compile_patterns(tuple(patterns))
    pending = [start]
    warned_deep = False
    while pending:
        parts = pending.pop()
        try:
            fd = dirfd.open_below(root_fd, parts)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.errno == errno.ELOOP:
                continue  # removed, or replaced by a file or a symlink, since it was listed
            where = os.path.join(label, *parts)
            if exc.errno == errno.ENAMETOOLONG:
                if not warned_deep:
                    log.warning(
                        "scan: not entering %r: more than %d folders deep",
                        where,
                        dirfd.MAX_DEPTH,
                    )
                    warned_deep = True
                continue
            log.warning("scan: skipping unreadable folder %r: %s", where, exc)
            continue
        try:
            with os.scandir(fd) as entries:
                while True:
                    try:
                        entry = next(entries)
                    except StopIteration:
                        break
                    except OSError as exc:  # e.g. EIO/ESTALE while reading a network share
                        log.warning(
                            "scan: error while reading folder %r: %s",
                            os.path.join(label, *parts),
                            exc,
                        )
                        break
                    name = entry.name
                    if (top_internal and not parts and name == INTERNAL_DIR) or (
                        regex is not None and regex.match(name)
                    ):
                        continue
                    kind = _entry_kind(entry, parts, name)
                    if kind is None:
                        continue
                    if kind == "directory":
                        pending.append((*parts, name))
                    else:
                        yield (*parts, name), kind
        finally:
            os.close(fd)


def _open_dir(path: str, *, follow: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    return os.open(path, flags)


def _entry_kind(entry: os.DirEntry[str], parts: tuple[str, ...], name: str) -> str | None:
    """Classify without following links; ``None`` if the entry vanished meanwhile.

    ``is_symlink``/``is_dir``/``is_file`` come free from ``d_type`` on most file
    systems; only the rare special file costs an ``lstat``.
    """
    try:
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "directory"
        if entry.is_file(follow_symlinks=False):
            return "file"
        mode = entry.stat(follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("scan: cannot classify %r: %s", os.path.join(*parts, name), exc)
        return None
    return special_kind(mode) or "file"


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: hands every event straight to the watcher's queue."""

    def __init__(self, watcher: InboxWatcher) -> None:
        super().__init__()
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        """Replace the base class's per-type method lookup with one cheap call."""
        self._watcher._on_event(event)  # friend access, by design


def _observer_kind(observer: BaseObserver) -> str:
    name = type(observer).__name__
    if name.startswith("Polling"):
        return "polling"
    known = {
        "InotifyObserver": "inotify",
        "FSEventsObserver": "fsevents",
        "KqueueObserver": "kqueue",
        "WindowsApiObserver": "windows",
    }
    return known.get(name, name)


_STOP_RACE = "InotifyEmitter.queue_events() called when the thread is inactive"


class _DropStopRace(logging.Filter):
    """watchdog 7 logs this at ERROR when its reader thread races its own shutdown.

    Nothing is lost (we are stopping; the next start scans), but an error line on every
    clean stop would send operators looking for a fault that is not there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _STOP_RACE


def _quiet_stop_race() -> None:
    logger = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _DropStopRace) for f in logger.filters):
        logger.addFilter(_DropStopRace())


class InboxWatcher:
    """Collect "something happened to this path" notices from a watchdog observer.

    The watchdog handler does no work on the observer thread: it filters the path
    (string operations only), then records it in an ordered dict under a lock and sets a
    :class:`threading.Event`.  Repeated events for one path (a large file produces
    thousands of IN_MODIFY) collapse into one entry that keeps its place in the queue and
    the latest close-write hint, so bursts cost memory per file, not per event.

    The queue is bounded (``max_queued`` distinct paths plus directories).  When full,
    new paths are dropped and :meth:`take_overflow` returns True, as it also does once
    the queue passes ``high_water``: a burst that large means the daemon is falling
    behind, and a rescan is cheaper than trusting a queue that may overflow next.

    Directories: files that arrive inside a directory moved (or copied) into the inbox
    may produce no per-file events at all (depending on the observer and on timing),
    so every directory created in or moved into the inbox is reported by
    :meth:`drain_dirs`; the daemon must ``scan(watcher.inbox, patterns, under=d)``
    each of them.  Directory events never appear in :meth:`drain`.

    All paths start with :attr:`inbox` (``os.path.abspath`` of the configured folder,
    like :func:`scan`).  The observer itself watches the ``os.path.realpath`` of it:
    watchdog sets IN_DONT_FOLLOW, so watching a symlinked inbox by its link name would
    watch the link and miss every file at its top level.  Event paths are translated
    back, so callers never see the resolved name.
    """

    def __init__(
        self,
        inbox: str | os.PathLike[str],
        *,
        observer: ObserverKind,
        ignore: Sequence[str],
        polling_interval_seconds: float = 1.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        high_water: int | None = None,
        wake_fd: int | None = None,
    ) -> None:
        """Configure, without touching the file system (see :meth:`start`).

        ``observer``: ``"native"`` is watchdog's platform observer (inotify on Linux);
        ``"polling"`` snapshots the tree every ``polling_interval_seconds`` (for NFS, SMB,
        sshfs, where native events never arrive for remote writers); ``"auto"`` tries
        native and falls back to polling with a warning, e.g. when the inotify watch or
        instance limit is reached.  ``high_water`` defaults to three quarters of
        ``max_queued``.  ``wake_fd`` (a non-blocking pipe) gets one byte whenever the
        queue stops being empty, so a caller blocked in ``select`` on it sees a new
        file at once instead of at its next poll.
        """
        if observer not in ("auto", "native", "polling"):
            raise ValueError(f"observer must be 'auto', 'native' or 'polling', got {observer!r}")
        if not polling_interval_seconds > 0:
            raise ValueError(
                f"polling_interval_seconds must be > 0, got {polling_interval_seconds!r}"
            )
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued!r}")
        if high_water is None:
            high_water = max(1, max_queued * 3 // 4)
        if not 1 <= high_water <= max_queued:
            raise ValueError(f"high_water must be between 1 and max_queued, got {high_water!r}")
        self._inbox = os.path.abspath(inbox)
        self._watched = os.path.realpath(inbox)
        self._watched_prefix = self._watched.rstrip(os.sep) + os.sep
        self._inbox_prefix = self._inbox.rstrip(os.sep) + os.sep
        self._mode: ObserverKind = observer
        self._patterns = tuple(ignore)
        self._regex = _compile_patterns(self._patterns)
        self._interval = float(polling_interval_seconds)
        self._max_queued = max_queued
        self._high_water = high_water
        self._handler = _Handler(self)
        self._lock = threading.Lock()
        self._pending = threading.Event()
        self._wake_fd = wake_fd
        self._files: OrderedDict[str, bool] = OrderedDict()
        self._dirs: OrderedDict[str, None] = OrderedDict()
        self._overflow = False
        self._observer: BaseObserver | None = None
        self._watched_id: tuple[int, int] | None = None
        self._kind = "stopped"
        self.events_seen = 0
        """Relevant events received (after filtering), including dropped ones."""
        self.events_dropped = 0
        """Events dropped because the queue was full."""

    # -- lifecycle ------------------------------------------------------------------

    @property
    def inbox(self) -> Path:
        """The inbox as configured (made absolute, not resolved); every path starts with it."""
        return Path(self._inbox)

    @property
    def kind(self) -> str:
        """Observer actually in use (``"inotify"``, ``"polling"``...), for the start-up log.

        ``"stopped"`` before the first :meth:`start`; afterwards the last one used.
        """
        return self._kind

    @property
    def alive(self) -> bool:
        """True while the observer and its emitter threads all run, on the inbox.

        watchdog stops an emitter silently when the inbox itself is deleted (inotify's
        ``IN_DELETE_SELF``) or (polling) reads as missing, e.g. during a network share
        outage.  A *renamed* inbox stops nothing: an inotify watch follows the folder,
        not its name, and watchdog does not listen for ``IN_MOVE_SELF``, so events of
        ``inbox.old`` would keep arriving under the inbox's name while the new folder at
        that name is not watched.  So :attr:`replaced` counts as not alive too; the
        daemon checks this and starts a new watcher instead of relying on scans alone.
        """
        observer = self._observer
        if observer is None or not observer.is_alive() or self.replaced:
            return False
        try:
            emitters = tuple(observer.emitters)
        except RuntimeError:  # set changed size during iteration: being stopped
            return False
        if not emitters or not all(emitter.is_alive() for emitter in emitters):
            return False
        # InotifyObserver reads the kernel queue in a thread of its own (private
        # attribute); if it dies, emitters and observer keep running but see nothing.
        reader = getattr(observer, "_inotify_fd", None)
        return not isinstance(reader, threading.Thread) or reader.is_alive()

    @property
    def replaced(self) -> bool:
        """True once the inbox's name no longer leads to the folder being watched: it was
        deleted or renamed (and perhaps made again), or is missing (a lost mount)."""
        watched = self._watched_id
        if watched is None:
            return False
        return _identity(self._inbox) != watched

    def start(self) -> None:
        """Start watching.  Raises ``FileNotFoundError`` if the inbox is not a folder.

        In ``"auto"`` mode any ``OSError`` from the native observer (ENOSPC: watch limit,
        EMFILE: instance limit) falls back to polling with a warning; in ``"native"``
        mode it propagates.  Nothing is left running when this raises.
        """
        _quiet_stop_race()
        if self._observer is not None:
            raise RuntimeError("InboxWatcher already started")
        _silence_benign_watchdog_warnings()
        watched_id = _identity(self._watched)
        if watched_id is None:
            raise FileNotFoundError(errno.ENOENT, "inbox is not a folder", self._inbox)
        if self._mode == "polling":
            observer = self._start_observer(self._new_polling)
        elif self._mode == "native":
            observer = self._start_observer(self._new_native)
        else:
            try:
                observer = self._start_observer(self._new_native)
            except OSError as exc:
                log.warning(
                    "native file events unavailable for %s (%s); falling back to polling "
                    "every %.3g s",
                    self._inbox,
                    exc,
                    self._interval,
                )
                observer = self._start_observer(self._new_polling)
        self._observer = observer
        self._watched_id = watched_id
        self._kind = _observer_kind(observer)
        if self._mode != "polling" and self._kind == "polling":
            log.warning("no native file event support on this platform; polling %s", self._inbox)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the observer and join its threads.  Idempotent.

        ``timeout`` bounds the final join so that a hung network mount cannot hang
        shutdown forever (watchdog threads are daemon threads).
        """
        observer = self._observer
        if observer is None:
            return
        self._observer = None
        # The caller may close wake_fd once we return, even if a hung thread lives on.
        self._wake_fd = None
        observer.stop()
        observer.join(timeout)
        if observer.is_alive():
            log.warning("watch observer for %s did not stop within %s s", self._inbox, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def _new_native(self) -> BaseObserver:
        return Observer()

    def _new_polling(self) -> BaseObserver:
        # PollingObserverVFS rather than PollingObserver: the latter snapshots with
        # os.stat, which follows symlinks.  A link to / in the inbox then makes every
        # poll walk the whole machine, and a symlink loop below it raises ELOOP, which
        # watchdog treats as a transient error and retries forever: polling stops
        # reporting anything.  lstat plus a listdir that skips ignored names and our own
        # folder also keeps each poll (one stat per entry, expensive on NFS) small.
        return PollingObserverVFS(
            stat=os.lstat, listdir=self._poll_listdir, polling_interval=self._interval
        )

    def _poll_listdir(self, path: str | None) -> Iterator[os.DirEntry[str]]:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if path == self._watched and name == INTERNAL_DIR:
                    continue
                if self._regex is not None and self._regex.match(name):
                    continue
                yield entry

    def _start_observer(self, factory: Callable[[], BaseObserver]) -> BaseObserver:
        observer = factory()
        try:
            observer.schedule(
                self._handler, self._watched, recursive=True, event_filter=_EVENT_FILTER
            )
            observer.start()
        except BaseException:
            _discard(observer)
            raise
        return observer

    # -- queue ----------------------------------------------------------------------

    def drain(self, max_items: int | None = None) -> list[tuple[str, bool]]:
        """Take up to ``max_items`` queued ``(path, closed_hint)`` pairs, oldest first.

        Never blocks.  ``closed_hint`` is True when the latest event for the path was an
        inotify close-write.
        """
        with self._lock:
            files = self._files
            if max_items is None or max_items >= len(files):
                out = list(files.items())
                files.clear()
            else:
                out = [files.popitem(last=False) for _ in range(max(0, max_items))]
            if not files and not self._dirs:
                self._pending.clear()
        return out

    def drain_dirs(self) -> list[str]:
        """Take the directories created in or moved into the inbox since the last call.

        Each must be scanned (``scan(watcher.inbox, patterns, under=d)``): their files
        may never produce events of their own.
        """
        with self._lock:
            out = list(self._dirs)
            self._dirs.clear()
            if not self._files:
                self._pending.clear()
        return out

    def wait(self, timeout: float) -> bool:
        """Block until something is queued or ``timeout`` passes; True if something is."""
        return self._pending.wait(timeout)

    @property
    def queued(self) -> int:
        """Paths plus directories currently queued (for status lines)."""
        with self._lock:
            return len(self._files) + len(self._dirs)

    @property
    def overflow_suspected(self) -> bool:
        """True if events were dropped, or the queue passed its high-water mark."""
        return self._overflow

    def take_overflow(self) -> bool:
        """Return and clear :attr:`overflow_suspected`; True means "rescan soon".

        watchdog does not pass the kernel's IN_Q_OVERFLOW on to handlers (it only logs a
        warning), so this flag covers our own queue; periodic scans cover the rest.
        """
        with self._lock:
            value = self._overflow
            self._overflow = False
        return value

    # -- observer thread --------------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        """Filter one event and queue its path.  Runs on watchdog's thread.

        Must never raise: an exception here ends watchdog's dispatcher thread, and with
        it all further events, silently.  An unexpected failure is logged and turned
        into an overflow notice so the daemon rescans.
        """
        try:
            if isinstance(event, FileSystemMovedEvent):
                raw = event.dest_path  # the final name: rsync/scp rename temp files
                if not raw:
                    return
            else:
                raw = event.src_path
            watched_path = os.fsdecode(raw)
            if not watched_path.startswith(self._watched_prefix):
                return  # moved out of the inbox, or the inbox itself
            rel = watched_path[len(self._watched_prefix) :]
            if _is_internal(rel) or (
                self._regex is not None and any(self._regex.match(p) for p in _split(rel))
            ):
                return
            path = self._inbox_prefix + rel
            if event.is_directory:
                if isinstance(event, DirCreatedEvent | DirMovedEvent):
                    self._enqueue(path, closed=False, directory=True)
            elif isinstance(event, FileClosedEvent):
                self._enqueue(path, closed=True, directory=False)
            elif isinstance(
                event, FileCreatedEvent | FileModifiedEvent | FileMovedEvent | FileAttribEvent
            ):
                self._enqueue(path, closed=False, directory=False)
        except Exception:  # the observer thread must survive (see docstring)
            log.exception("error while queueing file event %r", event)
            with self._lock:
                self._overflow = True
                self._pending.set()

    def _enqueue(self, path: str, *, closed: bool, directory: bool) -> None:
        with self._lock:
            self.events_seen += 1
            if directory:
                if path in self._dirs:
                    return
            elif path in self._files:
                self._files[path] = closed  # latest hint wins; keep the queue position
                return
            size = len(self._files) + len(self._dirs)
            if size >= self._max_queued:
                self.events_dropped += 1
                self._overflow = True
                self._notify()  # wake the daemon so it notices and rescans
                return
            if directory:
                self._dirs[path] = None
            else:
                self._files[path] = closed
            if size + 1 >= self._high_water:
                self._overflow = True
            self._notify()

    def _notify(self) -> None:
        """Set the pending flag; on its first setting also write to ``wake_fd``."""
        if self._pending.is_set():
            return
        self._pending.set()
        fd = self._wake_fd
        if fd is not None:
            with contextlib.suppress(OSError):  # full pipe: a wake-up is already there
                os.write(fd, b"w")


def _identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the folder ``path`` leads to, or None if it leads to none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _silence_benign_watchdog_warnings() -> None:
    """Ignore watchdog's "Callback with id ... already exists" RuntimeWarning.

    watchdog 7's inotify reader registers a new directory's subtree when it sees the
    directory's IN_CREATE, then again for each sub-directory's own IN_CREATE, so a quick
    ``mkdir -p a/b/c`` re-registers the same callback and warns from the reader thread.
    The re-registration is harmless, but under ``-W error`` (as in our test suite) the
    warning becomes an exception that kills the reader thread, and all events stop
    while the observer keeps looking alive.  The filter is as narrow as possible
    (message, category and module); ``filterwarnings`` replaces an identical filter
    rather than stacking it, so calling this on every start is fine.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"Callback with id '\d+' already exists for watch",
        category=RuntimeWarning,
        module=r"watchdog\.observers\.inotify",
    )


def _discard(observer: BaseObserver) -> None:
    """Release an observer whose start failed.

    InotifyObserver starts its inotify reader thread in ``__init__``; only ``stop()``
    joins it, so skipping this would leak a thread and an inotify instance per failed
    start.
    """
    try:
        observer.stop()
        if observer.is_alive():
            observer.join()
    except Exception:  # cleanup must not mask the original error
        log.debug("error while discarding a failed observer", exc_info=True)
