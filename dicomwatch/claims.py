"""Taking files out of the inbox: claims, the node lock, recovery and adoption, tidying.

A settled file is claimed by renaming it into ``inbox/.dicomwatch/claims/<node>/``:
``rename`` is atomic even on a shared network filesystem, so two daemons on one inbox
never both take a file.  A claimed file belongs to exactly one node; on start a daemon
files whatever its previous run left claimed, and hands the claims of nodes that are
gone (their lock is free) back to the inbox.

Anyone who can write the inbox can rename, replace or plant anything in it at any
moment, ``inbox/.dicomwatch`` included (renaming an entry needs write access to the
folder holding it, not to the entry).  So:

* Nothing below the inbox is reached by a path string.  Every rename, link, unlink,
  ``mkdir`` and ``rmdir`` is made relative to a folder opened component by component
  with ``O_DIRECTORY | O_NOFOLLOW`` (:mod:`dicomwatch.dirfd`): a folder swapped for a
  symlink is never followed.
* dicomwatch's own folders, ``.dicomwatch``, ``claims`` and ``claims/<node>``, must be
  real folders owned by the user the daemon runs as; otherwise the daemon refuses to
  start (:class:`~dicomwatch.errors.ConfigError`, exit 78).  They are kept writable by
  their owner only, so a sender can rename ``.dicomwatch`` away but never change what
  is inside.  The daemon holds them open: claims always land in the folder it checked.
  If ``.dicomwatch`` (or the whole inbox) is moved or deleted while it runs, the next
  claim makes and checks a new one; if what now has the name may not be used, no file
  is claimed (:class:`UnsafeFolderError`, logged) until it is removed.
* Workers reach a claimed file as ``/proc/<daemon pid>/fd/<claim folder>/...``: that
  names the folder the daemon holds open, wherever it has been moved since and whatever
  has its old name now.  (Where ``/proc`` does not show the daemon's descriptors, the
  plain path is used, and said so at start.)

The node lock.  ``claims/<node>.lock`` in the inbox says which claim folders have a
live owner; but the inbox can be deleted and made again under a running daemon, and
daemons on different inboxes may share one archive, where their staging folders are
named after the node.  So the node is also locked in the archive,
``archive/.dicomwatch/nodes/<node>.lock``, first, for the daemon's whole life: a second
daemon with the same ``node_id`` on the same archive is refused at once, whatever
happened to the inbox and whatever PID namespace each runs in.  (Only running daemons
take that lock; a node returning a stopped node's claims takes the inbox lock only.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dicomwatch import dirfd, watcher
from dicomwatch.archive import abandoned_locks_at, move_noreplace
from dicomwatch.config import INTERNAL_DIR
from dicomwatch.errors import ConfigError
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
NODES_DIR = "nodes"
"""In the archive's internal folder: one lock per running node."""
NODE_LOCK_WAIT_SECONDS = 10.0
"""How long a busy node lock may be another node returning our claims, not a twin."""
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER_MODE = 0o700
"""dicomwatch's folders in the inbox: nobody else needs to read them, and a sender who
could open a lock file could hold its ``flock`` and keep the daemon from starting."""
_EMPTY_LIMIT = 10_000
"""Empty folders remembered at once for tidying (bounded memory for hostile inboxes)."""

ClaimMiss = Literal["later", "gone"]
"""``later``: an earlier file of that name is still ours, settle this one again;
``gone``: taken by another daemon or removed by the sender."""


class UnsafeFolderError(PermissionError):
    """The internal folder was replaced, while running, by one that may not be used.

    Raised by :meth:`Claims.claim`: the file stays in the inbox and is tried again, so
    the daemon carries on once someone removes what was planted.
    """


@dataclass
class _Folders:
    """dicomwatch's folders in one inbox, held open: where claims go and come from."""

    inbox: int
    inbox_id: tuple[int, int]
    internal: int
    internal_id: tuple[int, int]
    root: int
    lock: int
    node: int
    prefix: str
    """How a worker names the claim folder: ``/proc/<pid>/fd/<node>`` or its path."""

    def close(self) -> None:
        for fd in (self.node, self.lock, self.root, self.internal, self.inbox):
            with contextlib.suppress(OSError):
                os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _split(rel: str) -> tuple[str, ...]:
    return tuple(p for p in rel.split(os.sep) if p and p != os.curdir)


class Claims:
    """This node's claim folder, its locks, and the files claimed and not yet filed."""

    def __init__(
        self,
        inbox: Path,
        node: str,
        *,
        archive: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self.node = node
        self.archive = archive
        self.root = inbox / INTERNAL_DIR / CLAIMS_DIR
        self.folder = self.root / node
        self.claimed: set[str] = set()
        self._inbox_abs = os.path.abspath(inbox)
        self._where: dict[str, tuple[_Folders, tuple[str, ...]]] = {}
        self._folders: _Folders | None = None
        self._retired: list[_Folders] = []
        self._archive_lock: int | None = None
        self._fd_lock = threading.Lock()
        self._closing = False
        self._tidy_abort = False
        self._refusal: str | None = None
        self._warned_proc = False
        self._clock = clock
        self._empty_since: dict[tuple[str, tuple[str, ...]], tuple[float, tuple[int, int]]] = {}
        """Empty folders by (tree, parts): when first seen empty, and (inode, mtime)."""

    # ----- the node locks and our folders ----------------------------------------------

    def lock(self) -> None:
        """Lock the node in the archive, then open (making if need be) and check our
        folders in the inbox and lock ``claims/<node>.lock``.  ``ConfigError`` if a
        daemon with our node_id runs, or a folder of ours may not be used."""
        self._closing = False
        try:
            if self.archive is not None:
                self._archive_lock = self._lock_in_archive(self.archive)
            self._folders = self._open_folders(wait=True)
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        """Release both locks and every folder held (also those of an earlier inbox)."""
        self._closing = True
        with self._fd_lock:
            for folders in [*self._retired, *([self._folders] if self._folders else [])]:
                folders.close()
            self._retired.clear()
            self._folders = None
            if self._archive_lock is not None:
                os.close(self._archive_lock)
                self._archive_lock = None

    def _twin(self, where: Path) -> ConfigError:
        return ConfigError(
            f"another dicomwatch with node_id {self.node!r} is running on {where}; "
            "give each daemon its own node_id"
        )

    def _lock_in_archive(self, archive: Path) -> int:
        """``archive/.dicomwatch/nodes/<node>.lock``: held by running daemons only, so a
        busy one is a twin, refused at once.  The archive is not the senders' to write."""
        base = archive / INTERNAL_DIR / NODES_DIR
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"archive: cannot create {base}: {exc.strerror or exc}") from exc
        path = base / f"{self.node}.lock"
        while True:
            try:
                fd = os.open(path, _LOCK_FLAGS, 0o640)
            except OSError as exc:
                raise ConfigError(f"cannot open the node lock {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(fd)
                raise self._twin(archive) from exc
            with contextlib.suppress(FileNotFoundError):
                if _identity(os.stat(path, follow_symlinks=False)) == _identity(os.fstat(fd)):
                    return fd
            os.close(fd)  # removed after we opened it: lock the one there now

    def _open_folders(self, *, wait: bool) -> _Folders:
        """Open the inbox, then ``.dicomwatch``, ``claims``, the node lock and
        ``claims/<node>``, each checked (:meth:`_own_folder`)."""
        inbox = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened = [inbox]
        try:
            internal_label = os.path.join(self._inbox_abs, INTERNAL_DIR)
            internal = self._own_folder(inbox, INTERNAL_DIR, internal_label)
            opened.append(internal)
            root = self._own_folder(internal, CLAIMS_DIR, str(self.root))
            opened.append(root)
            lock = self._take_node_lock(root, wait=wait)
            opened.append(lock)
            # Our claim folder is made only once the lock is ours: an adopter removes it.
            node = self._own_folder(root, self.node, str(self.folder))
            opened.append(node)
            return _Folders(
                inbox=inbox,
                inbox_id=_identity(os.fstat(inbox)),
                internal=internal,
                internal_id=_identity(os.fstat(internal)),
                root=root,
                lock=lock,
                node=node,
                prefix=self._worker_prefix(node),
            )
        except BaseException:
            for fd in reversed(opened):
                os.close(fd)
            raise

    def _own_folder(self, parent: int, name: str, label: str) -> int:
        """Open (or make) folder ``name`` in ``parent``: it must be a folder, not a
        symlink, and belong to the user we run as.  Group and others lose write access."""
        try:
            fd = dirfd.open_dir_at(parent, name)
        except FileNotFoundError:
            try:
                os.mkdir(name, _FOLDER_MODE, dir_fd=parent)
            except FileExistsError:
                pass  # made meanwhile: opened and checked below like any other
            except OSError as exc:
                raise ConfigError(f"cannot create {label}: {exc.strerror or exc}") from exc
            fd = self._open_checked(parent, name, label)
        except OSError:
            fd = self._open_checked(parent, name, label)
        try:
            st = os.fstat(fd)
            euid = os.geteuid()
            if st.st_uid != euid:
                raise ConfigError(
                    f"{label} belongs to uid {st.st_uid}, not to the user dicomwatch runs "
                    f"as (uid {euid}): anyone who can write the inbox could have made it. "
                    "Look at what is in it, move it out of the inbox (dicomwatch makes a "
                    "new one) and start again"
                )
            if st.st_mode & 0o077:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)
                if st.st_mode & 0o022:
                    log.warning("%s was writable by group or others; it no longer is", label)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_checked(parent: int, name: str, label: str) -> int:
        try:
            return dirfd.open_dir_at(parent, name)
        except OSError as exc:
            if not isinstance(exc, NotADirectoryError) and exc.errno != errno.ELOOP:
                raise ConfigError(f"cannot open {label}: {exc.strerror or exc}") from exc
            kind = dirfd.kind_at(parent, name)
        if kind == "a symbolic link":
            raise ConfigError(
                f"{label} is a symbolic link, not a folder of dicomwatch's own: anyone who "
                "can write the inbox can plant one. Remove the link (not what it points "
                "to) and start again"
            )
        raise ConfigError(
            f"{label} is not a folder ({kind}): dicomwatch keeps its claims there. "
            "Move it out of the inbox and start again"
        )

    def _take_node_lock(self, root: int, *, wait: bool) -> int:
        """Lock ``<node>.lock``; a lock held past ``NODE_LOCK_WAIT_SECONDS`` means a twin.

        Another node returning our claims after a crash (:meth:`adopt_dead`) holds our
        lock while it moves them, then removes the lock file: so a busy lock is retried
        for a while before we refuse to start (exit 78 is never restarted), and a lock
        taken on a file that was removed meanwhile is taken again on the new one.
        """
        name = f"{self.node}.lock"
        deadline = time.monotonic() + (NODE_LOCK_WAIT_SECONDS if wait else 0.0)
        waited = False
        while True:
            try:
                fd = os.open(name, _LOCK_FLAGS, 0o600, dir_fd=root)
            except OSError as exc:
                label = self.root / name
                raise ConfigError(f"cannot open the node lock {label}: {exc.strerror}") from exc
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise ConfigError(f"the node lock {self.root / name} is not a regular file")
            if mode & 0o077:
                os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(fd)
                if time.monotonic() < deadline:
                    if not waited:
                        log.info(
                            "node lock %s is busy (another node may be returning our "
                            "claims); waiting",
                            self.root / name,
                        )
                    waited = True
                    time.sleep(0.1)
                    continue
                raise self._twin(self.inbox) from exc
            with contextlib.suppress(FileNotFoundError):
                named = os.stat(name, dir_fd=root, follow_symlinks=False)
                if _identity(named) == _identity(os.fstat(fd)):
                    return fd
            os.close(fd)

    def _worker_prefix(self, node: int) -> str:
        """``/proc/<pid>/fd/<node>``, if it leads to our claim folder; else its path."""
        proc = f"/proc/{os.getpid()}/fd/{node}"
        with contextlib.suppress(OSError):
            if _identity(os.stat(proc)) == _identity(os.fstat(node)):
                return proc
        if not self._warned_proc:
            log.warning(
                "%s does not show this process's open folders: workers reach claimed "
                "files by their path through the inbox, which someone renaming %s at the "
                "right moment could redirect",
                proc,
                os.path.join(self._inbox_abs, INTERNAL_DIR),
            )
            self._warned_proc = True
        return str(self.folder)

    def _current(self) -> _Folders:
        """Our folders, made again if the inbox or its ``.dicomwatch`` was replaced.

        Raises ``FileNotFoundError`` while the inbox is missing, and
        :class:`UnsafeFolderError` when what now has the name may not be used.
        """
        folders = self._folders
        if folders is None:
            raise RuntimeError("the claim folder is not locked")
        if _identity(os.stat(self.inbox)) == folders.inbox_id:
            with contextlib.suppress(FileNotFoundError):
                here = os.stat(INTERNAL_DIR, dir_fd=folders.inbox, follow_symlinks=False)
                if _identity(here) == folders.internal_id:
                    return folders
        self._tidy_abort = True  # a long tidying pass must not hold up the claims
        with self._fd_lock:
            self._tidy_abort = False
            try:
                new = self._open_folders(wait=False)
            except ConfigError as exc:
                message = str(exc)
                if message != self._refusal:
                    log.error("claiming nothing until this is fixed: %s", message)
                    self._refusal = message
                raise UnsafeFolderError(errno.EPERM, message) from exc
            self._retired.append(folders)  # files in flight are still reached through it
            self._folders = new
        self._refusal = None
        log.warning(
            "%s was deleted or moved (with the inbox, or alone); claiming into a new one",
            self.folder,
        )
        return new

    # ----- claiming and handing back ---------------------------------------------------

    def claim(self, path: str) -> Task | ClaimMiss:
        """Take a settled file by renaming it into our claim folder (atomic, one winner).

        Raises ``OSError`` when the rename is refused (a sender folder we may not write),
        :class:`UnsafeFolderError` while our internal folder may not be used.
        """
        rel = os.path.relpath(path, self._inbox_abs)
        parts = _split(rel)
        if not parts or parts[0] in (os.pardir, INTERNAL_DIR):
            return "gone"
        try:
            folders = self._current()
        except FileNotFoundError:
            return "gone"  # no inbox just now: nor the file
        claim = os.path.join(folders.prefix, *parts)
        if claim in self.claimed:
            return "later"
        *above, name = parts
        try:
            src = self._source_folder(folders, above)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                log.warning("not claiming %s: a folder on its way is not a folder now", path)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
                return "gone"
            raise
        if src is None:
            return "gone"
        try:
            try:
                st = os.stat(name, dir_fd=src, follow_symlinks=False)
            except FileNotFoundError:
                return "gone"
            if not stat.S_ISREG(st.st_mode):
                return "gone"  # replaced by a link or a FIFO since it settled
            try:
                dst = dirfd.open_below(folders.node, above, create=True)
            except FileNotFoundError:
                return "later"  # a claim sub-folder tidied away meanwhile
            try:
                if dirfd.lexists_at(dst, name):
                    return "later"
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
            except FileNotFoundError:
                # Our claim sub-folder vanished (try again), or the file did (nothing to do).
                return "later" if dirfd.lexists_at(src, name) else "gone"
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.claimed.add(claim)
        self._where[claim] = (folders, parts)
        return Task(path=claim, source=path, remove_source=True, rel_source=rel)

    def _source_folder(self, folders: _Folders, above: list[str]) -> int | None:
        """The open folder of a file to claim; None if it is inside a ``.dicomwatch`` of
        ours that was renamed (a sender may give it a name the scans do not skip): our
        own claims and lock files are never claimed again as inbox files."""
        if not above:
            return dirfd.open_below(folders.inbox, ())
        top = dirfd.open_dir_at(folders.inbox, above[0])
        try:
            ours = {f.internal_id for f in (folders, *self._retired)}
            if _identity(os.fstat(top)) in ours:
                return None
            return dirfd.open_below(top, above[1:])
        finally:
            os.close(top)

    def release(self, task: Task) -> None:
        """The claimed file was filed (or vanished): it is no longer ours to track."""
        self.claimed.discard(task.path)
        self._where.pop(task.path, None)

    def unclaim(self, task: Task) -> None:
        """Put a claimed file back under its inbox name, never over a newer file.

        Folders on its way that were tidied meanwhile are made again; a file that cannot
        go back (a symlink or a file where a folder was) stays claimed, filed on the
        next start.
        """
        where = self._where.get(task.path)
        if where is None:
            return
        folders, parts = where
        *above, name = parts
        try:
            inbox = self._current().inbox
        except OSError as exc:  # no inbox just now, or none we may use: stays claimed
            log.warning("cannot return %s to the inbox: %s", task.source, exc.strerror)
            return
        try:
            src = dirfd.open_below(folders.node, above)
        except FileNotFoundError:
            self.release(task)  # the claim is gone
            return
        except OSError as exc:
            log.warning("cannot return %s to the inbox: %s", task.source, exc.strerror)
            return
        try:
            dst = dirfd.open_below(inbox, above, create=True)
            try:
                move_noreplace(name, name, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        except FileExistsError:
            return  # stays claimed; filed on the next start
        except FileNotFoundError:
            if not dirfd.lexists_at(src, name):
                self.release(task)
            return
        except OSError as exc:
            log.warning("cannot return %s to the inbox: %s", task.source, exc.strerror)
            return
        finally:
            os.close(src)
        self.release(task)

    # ----- start-up --------------------------------------------------------------------

    def recover_own(self) -> list[Task]:
        """Files our previous run had claimed are complete: file them first."""
        folders = self._current()
        tasks = []
        for parts, kind in watcher.walk_at(folders.node, label=str(self.folder)):
            if kind != "file":
                continue
            rel = os.path.join(*parts)
            claim = os.path.join(folders.prefix, rel)
            self.claimed.add(claim)
            self._where[claim] = (folders, parts)
            tasks.append(
                Task(
                    path=claim,
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
        """Hand claims of daemons that are gone (lock free) back to the inbox.

        A "claim folder" that is not a folder (a symlink planted next to a lock file)
        is left alone, as is each claim that cannot go back (logged); a node's folder
        and lock are removed only once every claim in it went back.
        """
        folders = self._current()
        for lock in abandoned_locks_at(folders.root, skip=self.node):
            node = lock.removesuffix(".lock")
            if node in ("", os.curdir, os.pardir):
                continue
            label = str(self.root / node)
            try:
                held = dirfd.open_dir_at(folders.root, node)
            except FileNotFoundError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock, dir_fd=folders.root)
                continue
            except OSError as exc:
                kind = dirfd.kind_at(folders.root, node) if exc.errno == errno.ENOTDIR else ""
                log.warning(
                    "claims of stopped node %s left alone: %s is %s",
                    node,
                    label,
                    kind or f"unreadable ({exc.strerror})",
                )
                continue
            try:
                moved, kept = self._return_claims(held, node, label, folders.inbox)
                left = next((p for p, k in watcher.walk_at(held, label=label) if k == "file"), None)
            finally:
                os.close(held)
            if moved:
                log.info("returned %d files claimed by stopped node %s to the inbox", moved, node)
            if kept == 0 and left is None:
                shutil.rmtree(node, dir_fd=folders.root, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock, dir_fd=folders.root)

    def _return_claims(self, held: int, node: str, label: str, inbox: int) -> tuple[int, int]:
        """Move each claimed file below ``held`` back to the inbox: (moved, kept)."""
        moved = kept = 0
        for parts, kind in watcher.walk_at(held, label=label):
            if kind != "file":
                continue
            *above, name = parts
            rel = os.path.join(*parts)
            if parts[0] == INTERNAL_DIR:
                log.warning(
                    "claim %s of stopped node %s left alone: inside %s", rel, node, INTERNAL_DIR
                )
                kept += 1
                continue
            try:
                src = dirfd.open_below(held, above)
                try:
                    dst = dirfd.open_below(inbox, above, create=True)
                    try:
                        move_noreplace(name, name, src_dir_fd=src, dst_dir_fd=dst)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            except FileExistsError:
                kept += 1
                continue
            except OSError as exc:
                log.warning(
                    "cannot return %s, claimed by stopped node %s, to the inbox: %s",
                    rel,
                    node,
                    exc.strerror or exc,
                )
                kept += 1
                continue
            moved += 1
        return moved, kept

    # ----- housekeeping ----------------------------------------------------------------

    def tidy(self, grace_seconds: float) -> None:
        """Remove empty inbox sub-folders (and claim sub-folders) after a grace period.

        Runs on the scanner thread.  ``rmdir`` only ever removes an empty folder, and the
        grace period leaves alone folders a sender has just made.  It is measured on the
        monotonic clock from when the folder was first *seen* empty, not on its mtime
        against the wall clock: a clock jump of a day, or ``rsync -t`` giving a new
        folder its source's old mtime, would make a folder made a moment ago look
        abandoned, and writes into it would fail.  The mtime and inode only tell whether
        the folder changed since (the grace then starts again).  At most
        ``_EMPTY_LIMIT`` folders are remembered; others wait for a later pass.  Folders
        are walked and removed relative to their open parent, never through a symlink.
        """
        with self._fd_lock:
            folders = self._folders
            if folders is None or self._closing:
                return
            try:
                if _identity(os.stat(self.inbox)) != folders.inbox_id:
                    return  # a new inbox: our folders are made again at the next claim
            except OSError:
                return
            now = self._clock()
            seen: set[tuple[str, tuple[str, ...]]] = set()
            for tree, fd, skip in (
                ("inbox", folders.inbox, INTERNAL_DIR),
                ("claims", folders.node, None),
            ):
                self._tidy_below(fd, (tree, ()), _Pass(now, grace_seconds, seen), skip=skip)
            if not self._closing:
                for key in [k for k in self._empty_since if k not in seen]:
                    del self._empty_since[key]

    def _tidy_below(
        self, fd: int, where: tuple[str, tuple[str, ...]], run: _Pass, *, skip: str | None
    ) -> bool:
        """Tidy the folders below ``fd``; True if ``fd``'s folder is empty afterwards."""
        if self._closing or self._tidy_abort:
            return False
        tree, parts = where
        empty = True
        subdirs: list[str] = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.name == skip:
                        empty = False
                    elif entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    else:
                        empty = False
        except OSError as exc:
            log.debug("cannot read folder %s: %s", os.path.join(tree, *parts), exc)
            return False
        for name in subdirs:
            if len(parts) >= dirfd.MAX_DEPTH:
                empty = False
                continue
            try:
                sub = dirfd.open_dir_at(fd, name)
            except OSError:
                empty = False
                continue
            key = (tree, (*parts, name))
            try:
                removable = self._tidy_below(sub, key, run, skip=None) and self._empty_long_enough(
                    key, os.fstat(sub), run
                )
            finally:
                os.close(sub)
            if not removable:
                empty = False
                continue
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                    log.debug("cannot remove empty folder %s: %s", name, exc)
                empty = False
                continue
            del self._empty_since[key]
        return empty

    def _empty_long_enough(
        self, key: tuple[str, tuple[str, ...]], st: os.stat_result, run: _Pass
    ) -> bool:
        """The folder ``key`` is empty now: has it been, unchanged, for the grace?"""
        state = (st.st_ino, st.st_mtime_ns)
        first = self._empty_since.get(key)
        if first is None or first[1] != state:
            if first is None and len(self._empty_since) >= _EMPTY_LIMIT:
                return False
            first = (run.now, state)
            self._empty_since[key] = first
        run.seen.add(key)
        return run.now - first[0] >= run.grace


@dataclass
class _Pass:
    """One tidying pass: its time on the monotonic clock, the grace, what it saw empty."""

    now: float
    grace: float
    seen: set[tuple[str, tuple[str, ...]]]
