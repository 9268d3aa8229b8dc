"""The inbox folder where ``dicomwatch receive`` puts instances it has acknowledged.

``inbox/.dicomwatch-received/<calling AE>/<SOPInstanceUID>.<token>.dcm``.  Every file
there was written to a temporary file, fsync'ed and hard-linked under its name in one
step, so it is complete the moment it appears: the watch daemon hands these files on
at once instead of waiting ``settle_seconds``.

That shortcut is only safe if nobody else can put a file there.  Senders share the
inbox (it is group-writable), so the folder is created by the service user with mode
0750 (chmod also narrows the ACL mask, so the inbox's default ACL grants no write
either), and both the receiver and the daemon check, before trusting it, that it is a
real folder owned by their own user and writable by nobody else.  A folder that fails
the check is not used: the receiver refuses to start, the daemon logs an error and
leaves it alone.  The leading dot keeps the folder out of the normal inbox scan (the
default ``ignore`` patterns); with patterns that do not hide it, its files are simply
settled like any other as well, which is harmless.

This module does not import pynetdicom: the watch daemon uses it without the extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from dicomwatch import watcher
from dicomwatch.config import Config

log = logging.getLogger(__name__)

RECEIVED_DIR = ".dicomwatch-received"
KEEP_FILE = ".keep"
"""Keeps the folder from being tidied away as empty (a sender could then recreate it)."""
HIDDEN = (".*",)
"""Names inside the folder that are never instances (the keep file)."""
PENDING_LIMIT = 20_000


def received_root(inbox: Path) -> Path:
    return inbox / RECEIVED_DIR


def untrusted_reason(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted to hold only complete files, or None if it can."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return "it does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder (a symlink or a file)"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this service's uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def make_private_dir(folder: Path) -> bool:
    """Create ``folder`` with mode 0750 (also when a default ACL asks for more).

    Returns True if it was created now (the caller fsyncs the parent).
    """
    try:
        os.mkdir(folder, 0o750)
    except FileExistsError:
        return False
    os.chmod(folder, 0o750, follow_symlinks=False)  # noqa: S103 - narrower than the ACL
    return True


def ensure_received_root(inbox: Path) -> Path:
    """Create the folder if needed; raise ``PermissionError`` if it cannot be trusted."""
    root = received_root(inbox)
    created = make_private_dir(root)
    reason = untrusted_reason(root)
    if reason is not None:
        raise PermissionError(f"{root} cannot be trusted: {reason}; remove it and start again")
    keep = root / KEEP_FILE
    if not keep.exists():
        fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        os.close(fd)
    if created:
        from dicomwatch.archive import fsync_dir

        fsync_dir(inbox)
    return root


class ReceivedFiles:
    """The daemon's side: received files, complete on arrival, for the intake.

    Watched (inotify or polling, like the inbox) while the folder exists and is trusted;
    scanned at start and with every inbox rescan.  :meth:`take` hands out paths in
    arrival order; the intake claims them like settled files.
    """

    def __init__(self, cfg: Config, *, wake_fd: int | None, watch: bool) -> None:
        self.cfg = cfg
        self.root = received_root(cfg.inbox)
        self.wake_fd = wake_fd
        self.watch = watch
        self.watcher: watcher.InboxWatcher | None = None
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._scanning = False
        self._warned: str | None = None

    def start(self) -> None:
        """Watch the folder (not with ``--once``) and look at what is already there."""
        self.check()
        if self.watch:
            self.rescan()
        else:  # --once: what is there now must be seen before the daemon decides it is done
            with self._lock:
                self._scanning = True
            self._scan()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def _trusted(self) -> bool:
        reason = untrusted_reason(self.root)
        if reason is None:
            self._warned = None
            return True
        if reason != "it does not exist" and reason != self._warned:
            log.error(
                "not taking files from %s: %s (files there wait until this is fixed)",
                self.root,
                reason,
            )
        self._warned = reason
        return False

    def check(self) -> None:
        """Watch the folder once it exists; a watcher that stopped is replaced."""
        if not self.watch:
            return
        if self.watcher is not None and self.watcher.alive:
            return
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if not self._trusted():
            return
        new = watcher.InboxWatcher(
            self.root,
            observer=self.cfg.observer,
            ignore=HIDDEN,
            polling_interval_seconds=self.cfg.polling_interval_seconds,
            wake_fd=self.wake_fd,
        )
        try:
            new.start()
        except OSError as exc:
            log.warning("cannot watch %s (%s); relying on rescans", self.root, exc)
            return
        self.watcher = new
        self.rescan()  # what arrived before the watch began

    def rescan(self) -> None:
        """Look at the whole folder again, on a thread (it may hold a backlog)."""
        with self._lock:
            if self._scanning:
                return
            self._scanning = True
        threading.Thread(target=self._scan, name="dicomwatch-scan-received", daemon=True).start()

    def _scan(self) -> None:
        try:
            if not self._trusted():
                return
            for path, kind in watcher.scan(self.root, HIDDEN):
                if kind != "file":
                    continue
                with self._lock:
                    if len(self._pending) >= PENDING_LIMIT:
                        return  # the next rescan finds the rest
                    self._pending[path] = None
            if self.wake_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(self.wake_fd, b"r")
        except OSError as exc:
            log.warning("scan of %s failed: %s", self.root, exc)
        finally:
            with self._lock:
                self._scanning = False

    def take(self, limit: int) -> list[str]:
        """Up to ``limit`` received files, oldest first; each is handed out once."""
        if self.watcher is not None:
            for path, _closed in self.watcher.drain():
                with self._lock:
                    self._pending[path] = None
            if self.watcher.drain_dirs() or self.watcher.take_overflow():
                self.rescan()
        out: list[str] = []
        with self._lock:
            while self._pending and len(out) < limit:
                path, _ = self._pending.popitem(last=False)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue  # claimed already, or gone
                if stat.S_ISREG(st.st_mode):
                    out.append(path)
        return out
