"""Durable filing: a file appears under its final name complete, or not at all.

The sequence for every file placed in the archive, quarantine or processed folder:

1. write the bytes to a temporary file in a staging folder *inside the same root*
   (same filesystem), ``fsync`` it;
2. make the destination folder, ``fsync``-ing the parent of every folder we create;
3. ``os.link`` the temporary file to the final name, which fails rather than overwrite;
4. ``fsync`` the destination folder so the new name survives a power cut;
5. unlink the temporary file.

A crash before 3 leaves only a temporary file in the staging folder; after 3, a
complete file.  Temporary files are kept out of the sorted tree on purpose: a crash
never leaves debris where PACS importers or users look, and stale temporaries are found
without walking the archive.  Each process that writes owns one staging folder and
holds an ``flock`` on its lock file; at start-up any staging folder whose lock can be
taken belongs to a dead process and is removed.  If the destination is on another
filesystem than the staging folder (a mount inside the archive), the temporary file is
written in the destination folder itself instead.

When the final name is taken, the existing file is compared byte for byte: identical
means the instance was filed before (a duplicate, nothing written); different means a
numbered name (``name~1.dcm``), never an overwrite.  After the first collision on a name
the ``Filer`` remembers the numbered files it has seen there (size, content digest,
SOPInstanceUID) and the next free number, so the thousandth instance wanting one name
costs one link, not a thousand comparisons; past ``MAX_COLLISIONS`` numbered names the
file is refused (``TooManyCollisionsError``) rather than retried for ever.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dicomwatch.config import INTERNAL_DIR
from dicomwatch.errors import TooManyCollisionsError
from dicomwatch.layout import ensure_inside, numbered

log = logging.getLogger(__name__)

STAGING_DIR = "staging"
TMP_SUFFIX = ".dwtmp"
MAX_COLLISIONS = 10_000
"""Names a destination may have (itself and ``~1`` up to ``~9999``); one more different
file wanting it is quarantined as ``too_many_collisions``."""
_CHUNK = 1 << 20
_INDEX_NAMES = 256
"""Destination names whose collision sets a Filer remembers (least recently used go)."""
_INDEX_MEMBERS = 50_000
"""Numbered files remembered over all those names (a few hundred bytes each)."""

Data = bytes | bytearray | memoryview
"""What can be placed: the encoder hands over a view into its output buffer."""
FileId = tuple[int, int]
"""``(st_dev, st_ino)``: which file, whatever path names it."""


@dataclass(frozen=True)
class Placement:
    """Where the bytes ended up and how."""

    path: Path
    duplicate: bool
    """An identical file already had this name; nothing new was written."""
    same_uid_differs: bool
    """A file with the same SOPInstanceUID but other content was found on the way."""
    renamed: bool
    """The first-choice name was taken by a different file."""
    file_id: FileId | None = field(default=None, compare=False)
    """For a duplicate, which file held the identical bytes: a caller about to remove
    its source must not when this is the source itself (the archive under another
    name, through a symlink or a bind mount)."""


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (new names, removals)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identical(path: Path, data: Data) -> FileId | None:
    """The file at ``path`` if it holds exactly ``data`` (read in chunks), else None."""
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
                return None
            view = memoryview(data)
            offset = 0
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    return (st.st_dev, st.st_ino) if offset == len(data) else None
                if view[offset : offset + len(chunk)] != chunk:
                    return None
                offset += len(chunk)
    except (IsADirectoryError, FileNotFoundError):
        return None


def _size_of(path: Path) -> int | None:
    """Size of what ``path`` names (-1: not a regular file), None if nothing does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _digest(data: Data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _file_digest(path: Path) -> bytes | None:
    h = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except (IsADirectoryError, FileNotFoundError):
        return None
    return h.digest()


class _CrossDevice(OSError):
    """The staging folder is on another filesystem than the destination folder."""


class _Collisions:
    """The numbered files of one destination name, as far as this Filer has seen them.

    Every number below ``next_free`` was taken when last looked at.  Other processes may
    add names at any time: a link that fails moves on to the next number, and the file
    found there is looked at like any other.  Each file is read at most once for its
    digest (only when a file of its size is placed) and once for its SOPInstanceUID, so
    a placement costs O(1) amortised, however many files share the name.
    """

    __slots__ = ("by_digest", "next_free", "sizes", "uid_counts", "uids", "undigested", "unread")

    def __init__(self) -> None:
        self.next_free = 0
        self.sizes: dict[int, int] = {}
        """number -> size (-1: not a regular file)"""
        self.undigested: dict[int, set[int]] = {}
        """size -> numbers whose digest is not known yet"""
        self.by_digest: dict[bytes, set[int]] = {}
        self.uids: dict[int, str | None] = {}
        """number -> SOPInstanceUID as read (None: unreadable)"""
        self.uid_counts: dict[str, int] = {}
        self.unread: set[int] = set()
        """numbers whose SOPInstanceUID has not been read"""

    def add(self, n: int, size: int, digest: bytes | None, uid: str | bool | None) -> None:
        """Record file ``n``; ``uid`` False means not read yet."""
        self.sizes[n] = size
        if digest is None:
            self.undigested.setdefault(size, set()).add(n)
        else:
            self.by_digest.setdefault(digest, set()).add(n)
        if uid is False:
            self.unread.add(n)
        else:
            self.set_uid(n, uid if isinstance(uid, str) else None)

    def set_uid(self, n: int, uid: str | None) -> None:
        self.unread.discard(n)
        self.uids[n] = uid
        if uid is not None:
            self.uid_counts[uid] = self.uid_counts.get(uid, 0) + 1

    def forget(self, n: int) -> None:
        size = self.sizes.pop(n, None)
        if size is None:
            return
        self.undigested.get(size, set()).discard(n)
        for numbers in self.by_digest.values():
            numbers.discard(n)
        self.unread.discard(n)
        uid = self.uids.pop(n, None)
        if uid is not None:
            self.uid_counts[uid] -= 1


def _still_linked(fd: int, path: Path) -> bool:
    """The open lock file is still the one named ``path``: a cleaner may have removed a
    free lock file between someone's ``open`` and ``flock``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2_noreplace(
    src: str, dst: str, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD
) -> bool | None:
    """``renameat2(..., RENAME_NOREPLACE)``: True if renamed, None if unsupported here."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - probe the symbol (glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return None
    rc = _libc.renameat2(
        src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE
    )
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None  # e.g. NFS: no RENAME_NOREPLACE
    raise OSError(err, os.strerror(err), dst)


_libc: Any = None  # ctypes.CDLL once probed, False where renameat2 is missing


def move_noreplace(
    src: str, dst: str, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError then).

    ``renameat2(RENAME_NOREPLACE)`` where the filesystem has it; otherwise a hard link
    and unlink, which also never replaces; and where hard links are refused (a file we
    do not own under ``fs.protected_hardlinks``), a checked rename.  Only that last
    fallback has a window in which a file arriving at ``dst`` could be replaced.

    With ``src_dir_fd``/``dst_dir_fd`` the names are relative to those open folders
    (the ``*at`` calls), so nothing above them is looked up again: pass plain names
    and folders opened with ``O_NOFOLLOW`` to be sure no symlink is followed.
    """
    src_at = _AT_FDCWD if src_dir_fd is None else src_dir_fd
    dst_at = _AT_FDCWD if dst_dir_fd is None else dst_dir_fd
    if _renameat2_noreplace(src, dst, src_at, dst_at):
        return
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    except PermissionError:
        if os.path.lexists(dst) if dst_dir_fd is None else _lexists_at(dst_dir_fd, dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    os.unlink(src, dir_fd=src_dir_fd)


def _lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class StagingOwner:
    """This process's claim on a staging folder under ``root``; held for its lifetime."""

    def __init__(self, root: Path, owner: str) -> None:
        base = root / INTERNAL_DIR / STAGING_DIR
        base.mkdir(parents=True, exist_ok=True)
        self.lock_path = base / f"{owner}.lock"
        self.path = base / owner
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(fd)
                raise RuntimeError(
                    f"staging folder {self.path} is in use by another process"
                ) from exc
            if _still_linked(fd, self.lock_path):
                break
            os.close(fd)  # we locked a file a cleaner had just removed: lock the new one
        self._fd = fd
        self.path.mkdir(exist_ok=True)

    def release(self) -> None:
        """Remove our staging folder (it holds nothing once all writers finished)."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        os.close(self._fd)


def abandoned_locks(base: Path, *, skip: str | None = None) -> Iterator[Path]:
    """Each ``<name>.lock`` in ``base`` whose owner is gone, locked while the caller tidies.

    A lock we can take means its owner process has ended (``flock`` dies with the
    process, on this host or, over NFSv4/SMB, another).  The lock is held until the
    caller's loop body is done, so no new owner can start on that name meanwhile.
    """
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        for name in abandoned_locks_at(fd, skip=skip):
            yield base / name
    finally:
        os.close(fd)


_LOCK_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def abandoned_locks_at(dir_fd: int, *, skip: str | None = None) -> Iterator[str]:
    """:func:`abandoned_locks` in the open folder ``dir_fd``: yields lock file names.

    Lock files are opened relative to the folder and never through a symlink, so a
    link named ``x.lock`` cannot make us lock (or the caller remove) a file elsewhere.
    """
    with os.scandir(dir_fd) as entries:
        locks = sorted(e.name for e in entries if e.name.endswith(".lock"))
    for name in locks:
        if skip is not None and name == f"{skip}.lock":
            continue
        try:
            fd = os.open(name, _LOCK_FLAGS, dir_fd=dir_fd)
        except OSError:
            continue  # gone, a symlink (ELOOP), or nothing we may open
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if not _still_linked_at(fd, dir_fd, name):
                continue  # released and taken again since we opened it: a live owner
            yield name
        finally:
            os.close(fd)


def _still_linked_at(fd: int, dir_fd: int, name: str) -> bool:
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def clean_stale_staging(root: Path) -> int:
    """Remove staging folders of processes that died; returns how many files went."""
    removed = 0
    for lock in abandoned_locks(root / INTERNAL_DIR / STAGING_DIR):
        folder = lock.with_suffix("")
        if folder.is_dir():
            removed += sum(1 for _ in folder.rglob("*"))
            shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return removed


class Filer:
    """Places bytes under one root durably; one instance per root per process.

    It remembers folders it has already made durable, so a series of hundreds of
    instances costs one ``mkdir``/``fsync`` chain, not hundreds.
    """

    def __init__(self, root: Path, staging: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.staging = staging
        self.fsync = fsync
        self._known_dirs: set[Path] = set()
        self._collisions: OrderedDict[Path, _Collisions] = OrderedDict()
        self._members = 0
        try:
            self._root_dev: int | None = os.stat(root).st_dev
        except OSError:
            self._root_dev = None

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            fsync_dir(path)

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` and parents, fsync-ing each parent that gained an entry."""
        if folder in self._known_dirs:
            return
        missing: list[Path] = []
        probe = folder
        while not probe.is_dir():
            missing.append(probe)
            if probe == self.root or probe.parent == probe:
                break
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            self._sync_dir(path.parent)
        if len(self._known_dirs) > 4096:
            self._known_dirs.clear()
        self._known_dirs.add(folder)

    def _open_temp(self, folder: Path) -> tuple[Path, int]:
        tmp = folder / f".{secrets.token_hex(8)}{TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return tmp, os.open(tmp, flags, 0o640)
        except FileNotFoundError:
            if folder != self.staging or not self._same_root_device():
                raise
        # Someone removed our staging folder (tidying ``.dicomwatch``): make it again, but
        # only on the filesystem the root was on at start.  A lazily unmounted archive
        # leaves a bare mount point, and files written there would vanish from view.
        folder.mkdir(parents=True, exist_ok=True)
        return tmp, os.open(tmp, flags, 0o640)

    def _same_root_device(self) -> bool:
        try:
            return os.stat(self.root).st_dev == self._root_dev
        except OSError:
            return False

    def _write_temp(self, folder: Path, data: Data) -> Path:
        tmp, fd = self._open_temp(folder)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def place(
        self,
        rel: PurePosixPath,
        data: Data,
        *,
        uid: str | None = None,
        uid_of: Callable[[Path], str | None] | None = None,
    ) -> Placement:
        """Put ``data`` at ``root/rel`` (or a numbered sibling), durably, never overwriting.

        ``uid_of`` reads the SOPInstanceUID of an existing different file, so a
        same-UID-different-content clash can be reported as a conflict.
        """
        dest = ensure_inside(self.root, rel)
        folder = dest.parent
        self._ensure_dir(folder)
        tmp = self._write_temp(self.staging, data)
        try:
            return self._link_into_place(tmp, dest, data, uid, uid_of)
        finally:
            tmp.unlink(missing_ok=True)

    def _link_into_place(
        self,
        tmp: Path,
        dest: Path,
        data: Data,
        uid: str | None,
        uid_of: Callable[[Path], str | None] | None,
    ) -> Placement:
        try:
            return self._link_numbered(tmp, dest, data, uid, uid_of)
        except _CrossDevice:
            # Staging is on another filesystem than this folder: stage beside it.
            local = self._write_temp(dest.parent, data)
            try:
                return self._link_numbered(local, dest, data, uid, uid_of)
            finally:
                local.unlink(missing_ok=True)

    def _try_link(self, tmp: Path, candidate: Path) -> bool:
        """Link ``tmp`` to ``candidate``: True if done, False if the name is taken."""
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            return False
        except FileNotFoundError:
            # The folder vanished under us (someone tidied the archive): remake it once.
            folder = candidate.parent
            self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            try:
                os.link(tmp, candidate)
            except FileExistsError:
                return False
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise _CrossDevice(exc.errno, exc.strerror, str(candidate)) from exc
            raise
        return True

    def _link_numbered(
        self,
        tmp: Path,
        dest: Path,
        data: Data,
        uid: str | None,
        uid_of: Callable[[Path], str | None] | None,
    ) -> Placement:
        folder = dest.parent
        want_uid = uid is not None and uid_of is not None
        index = self._collisions.get(dest)
        if index is None:
            # The common cases cost one link: a free name, or this very file again.
            if self._try_link(tmp, dest):
                self._sync_dir(folder)
                return Placement(dest, False, False, False)
            found = _identical(dest, data)
            if found is not None:
                # It may have been linked by a run that crashed before its fsync.
                self._sync_dir(folder)
                return Placement(dest, True, False, False, found)
            index = self._index(dest)
        else:
            self._collisions.move_to_end(dest)

        digest = _digest(data)
        size = len(data)
        for n in sorted(index.undigested.pop(size, ())):
            found_digest = _file_digest(folder / numbered(dest.name, n))
            if found_digest is None:
                self._forget(index, n)
            else:
                index.by_digest.setdefault(found_digest, set()).add(n)
        for n in sorted(index.by_digest.get(digest, ())):
            candidate = folder / numbered(dest.name, n)
            found = _identical(candidate, data)
            if found is not None:
                self._sync_dir(folder)
                return Placement(candidate, True, False, n > 0, found)
            self._forget(index, n)  # changed or removed behind our back
        if want_uid:
            assert uid_of is not None
            for n in sorted(index.unread):
                index.set_uid(n, uid_of(folder / numbered(dest.name, n)))
        same_uid_differs = want_uid and index.uid_counts.get(str(uid), 0) > 0

        n = index.next_free
        while n < MAX_COLLISIONS:
            candidate = folder / numbered(dest.name, n)
            if self._try_link(tmp, candidate):
                index.next_free = n + 1
                self._remember(index, n, size, digest, uid if want_uid else False)
                self._sync_dir(folder)
                return Placement(candidate, False, same_uid_differs, n > 0)
            # Taken since we looked (another writer): it may even be this very file.
            index.next_free = n + 1
            found = _identical(candidate, data)
            if found is not None:
                self._remember(index, n, size, digest, uid if want_uid else False)
                self._sync_dir(folder)
                return Placement(candidate, True, False, n > 0, found)
            other = _size_of(candidate)
            if other is not None:
                other_uid = uid_of(candidate) if want_uid and uid_of is not None else False
                same_uid_differs = same_uid_differs or (want_uid and other_uid == uid)
                self._remember(index, n, other, None, other_uid)
            n += 1
        raise TooManyCollisionsError(
            f"{MAX_COLLISIONS} different files already have the name {dest.name} or one of "
            f"its numbered forms in {folder}"
        )

    def _index(self, dest: Path) -> _Collisions:
        """Look once at every numbered file of ``dest`` up to the first free number.

        Linear in the names already taken, but done once per name and process: later
        placements on the name reuse what was found and add what they link.
        """
        index = _Collisions()
        self._collisions[dest] = index
        n = 0
        while n < MAX_COLLISIONS:
            size = _size_of(dest.parent / numbered(dest.name, n))
            if size is None:
                break
            self._remember(index, n, size, None, False)
            n += 1
        index.next_free = n
        return index

    def _remember(
        self, index: _Collisions, n: int, size: int, digest: bytes | None, uid: str | bool | None
    ) -> None:
        if n not in index.sizes:
            self._members += 1
        else:
            index.forget(n)
        index.add(n, size, digest, uid)
        while len(self._collisions) > _INDEX_NAMES or (
            self._members > _INDEX_MEMBERS and len(self._collisions) > 1
        ):
            _, oldest = self._collisions.popitem(last=False)
            self._members -= len(oldest.sizes)

    def _forget(self, index: _Collisions, n: int) -> None:
        if n in index.sizes:
            index.forget(n)
            self._members -= 1

    def write_once(self, rel: PurePosixPath, data: bytes) -> Path:
        """Write a small companion file (a reason sidecar) unless one exists already."""
        dest = ensure_inside(self.root, rel)
        self._ensure_dir(dest.parent)
        tmp = self._write_temp(self.staging, data)
        try:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return dest
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Staging is on another filesystem than this folder: stage beside it.
                tmp.unlink(missing_ok=True)
                tmp = self._write_temp(dest.parent, data)
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    return dest
            self._sync_dir(dest.parent)
            return dest
        finally:
            tmp.unlink(missing_ok=True)
