"""Taking files out of the inbox: claims, the node lock, recovery and adoption, tidying.

A settled file is claimed by renaming it into ``inbox/.dicomwatch/claims/<node>/``:
``rename`` is atomic even on a shared network filesystem, so two daemons on one inbox
never both take a file.  A claimed file belongs to exactly one node; on start a daemon
files whatever its previous run left claimed, and hands the claims of nodes that are
gone (their lock is free) back to the inbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from dicomwatch import watcher
from dicomwatch.archive import abandoned_locks, move_noreplace
from dicomwatch.config import INTERNAL_DIR
from dicomwatch.errors import ConfigError
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
NODE_LOCK_WAIT_SECONDS = 10.0
"""How long a busy node lock may be another node returning our claims, not a twin."""
_KNOWN_DIRS_LIMIT = 4096

ClaimMiss = Literal["later", "gone"]
"""``later``: an earlier file of that name is still ours, settle this one again;
``gone``: taken by another daemon or removed by the sender."""


class Claims:
    """This node's claim folder, its lock, and the files claimed and not yet filed."""

    def __init__(self, inbox: Path, node: str) -> None:
        self.inbox = inbox
        self.node = node
        self.root = inbox / INTERNAL_DIR / CLAIMS_DIR
        self.folder = self.root / node
        self.claimed: set[str] = set()
        self._known_dirs: set[str] = set()
        self._lock_fd: int | None = None

    # ----- the node lock -------------------------------------------------------------

    def lock(self) -> None:
        """Lock ``<node>.lock``; a lock held past ``NODE_LOCK_WAIT_SECONDS`` means a twin.

        Another node returning our claims after a crash (:meth:`adopt_dead`) holds our
        lock while it moves them, then removes the lock file: so a busy lock is retried
        for a while before we refuse to start (exit 78 is never restarted), and a lock
        taken on a file that was removed meanwhile is taken again on the new one.  Our
        claim folder is made only once the lock is ours: the adopter removes it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{self.node}.lock"
        deadline = time.monotonic() + NODE_LOCK_WAIT_SECONDS
        waited = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(fd)
                if time.monotonic() < deadline:
                    if not waited:
                        log.info(
                            "node lock %s is busy (another node may be returning our "
                            "claims); waiting",
                            path,
                        )
                    waited = True
                    time.sleep(0.1)
                    continue
                raise ConfigError(
                    f"another dicomwatch with node_id {self.node!r} is running on "
                    f"{self.inbox}; give each daemon its own node_id"
                ) from exc
            with contextlib.suppress(FileNotFoundError):
                named, held = os.stat(path), os.fstat(fd)
                if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    break
            os.close(fd)
        self._lock_fd = fd
        self.folder.mkdir(parents=True, exist_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----- claiming and handing back ---------------------------------------------------

    def claim(self, path: str) -> Task | ClaimMiss:
        """Take a settled file by renaming it into our claim folder (atomic, one winner).

        Raises ``OSError`` when the rename is refused (a sender folder we may not write).
        """
        rel = os.path.relpath(path, self.inbox)
        if rel.startswith(".."):
            return "gone"
        claim = os.path.join(self.folder, rel)
        if claim in self.claimed or os.path.lexists(claim):
            return "later"
        try:
            parent = os.path.dirname(claim)
            if parent not in self._known_dirs:
                os.makedirs(parent, exist_ok=True)
                if len(self._known_dirs) > _KNOWN_DIRS_LIMIT:
                    self._known_dirs.clear()
                self._known_dirs.add(parent)
            os.rename(path, claim)
        except FileNotFoundError:
            self._known_dirs.discard(os.path.dirname(claim))
            # Our claim folder vanished (try again), or the file did (nothing to do).
            return "later" if os.path.lexists(path) else "gone"
        self.claimed.add(claim)
        return Task(path=claim, source=path, remove_source=True, rel_source=rel)

    def release(self, task: Task) -> None:
        """The claimed file was filed (or vanished): it is no longer ours to track."""
        self.claimed.discard(task.path)

    def unclaim(self, task: Task) -> None:
        """Put a claimed file back under its inbox name, never over a newer file."""
        try:
            move_noreplace(task.path, task.source)
        except FileExistsError:
            return  # stays claimed; filed on the next start
        except FileNotFoundError:
            self.claimed.discard(task.path)
            return
        except OSError as exc:
            log.warning("cannot return %s to the inbox: %s", task.source, exc.strerror)
            return
        self.claimed.discard(task.path)

    # ----- start-up --------------------------------------------------------------------

    def recover_own(self) -> list[Task]:
        """Files our previous run had claimed are complete: file them first."""
        tasks = []
        for path in self._files_below(self.folder):
            rel = os.path.relpath(path, self.folder)
            self.claimed.add(path)
            tasks.append(
                Task(
                    path=path,
                    source=os.path.join(self.inbox, rel),
                    remove_source=True,
                    rel_source=rel,
                )
            )
        if tasks:
            log.info(
                "recovered %d files claimed by an earlier run of node %s", len(tasks), self.node
            )
        return tasks

    def adopt_dead(self) -> None:
        """Hand claims of daemons that are gone (lock free) back to the inbox."""
        for lock in abandoned_locks(self.root, skip=self.node):
            node = lock.stem
            folder = self.root / node
            moved = 0
            for path in self._files_below(folder):
                target = self.inbox / os.path.relpath(path, folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    move_noreplace(path, str(target))
                except FileExistsError:
                    continue
                moved += 1
            if moved:
                log.info("returned %d files claimed by stopped node %s to the inbox", moved, node)
            if next(self._files_below(folder), None) is None:
                shutil.rmtree(folder, ignore_errors=True)
                lock.unlink(missing_ok=True)

    @staticmethod
    def _files_below(folder: Path) -> Iterator[str]:
        return (path for path, kind in watcher.scan(folder, ()) if kind == "file")

    # ----- housekeeping ----------------------------------------------------------------

    def tidy(self, grace_seconds: float) -> None:
        """Remove empty inbox sub-folders (and claim sub-folders) after a grace period.

        Runs on the scanner thread.  ``rmdir`` only ever removes an empty folder, and the
        grace period (on the folder's mtime, which changes whenever an entry is added)
        leaves alone folders a sender has just made.
        """
        cutoff = time.time() - grace_seconds
        for top in (self.inbox, self.folder):
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                if Path(dirpath) == top or (
                    top == self.inbox and INTERNAL_DIR in Path(dirpath).relative_to(top).parts
                ):
                    continue
                if filenames or (
                    dirnames and any(os.path.lexists(os.path.join(dirpath, d)) for d in dirnames)
                ):
                    continue
                try:
                    st = os.lstat(dirpath)
                    if stat.S_ISDIR(st.st_mode) and st.st_mtime < cutoff:
                        os.rmdir(dirpath)
                        self._known_dirs.discard(dirpath)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                        log.debug("cannot remove empty folder %s: %s", dirpath, exc)
