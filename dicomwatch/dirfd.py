"""Path operations below an open folder that never follow a symlink.

Anyone who can write the inbox can change anything below it at any moment: a folder
the daemon listed a moment ago may be a symlink to ``/`` by the time it is used.  A
path string is looked up again, component by component, on every system call, and
``O_NOFOLLOW`` only guards its last component.  So every operation below the inbox
starts from an open folder and walks one component at a time, each opened relative to
the previous one with ``O_DIRECTORY | O_NOFOLLOW``: a symlink (or a file, a FIFO) where
a folder should be ends the walk with ``ENOTDIR``, and the final name is then used
relative to the last folder (``dir_fd=``).  ``O_NONBLOCK`` makes sure a FIFO is never
waited on (``O_DIRECTORY`` refuses it before it is opened anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_DEPTH = 64
"""Folders nested deeper below the inbox are left alone: each walk costs one ``open``
per level, and a sender could otherwise nest folders thousands deep to make every scan
quadratic."""


def open_dir_at(dir_fd: int, name: str) -> int:
    """Open the folder ``name`` in ``dir_fd``; ``NotADirectoryError`` if it is a symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_below(root_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """A new descriptor for ``root/parts[0]/.../parts[-1]``, never through a symlink.

    ``create`` makes missing folders (mode ``0o777`` less the umask, as ``mkdir -p``
    does).  Raises ``NotADirectoryError`` where a component is not a folder (a symlink
    included), ``FileNotFoundError`` where one is missing, ``OSError(ENAMETOOLONG)``
    beyond :data:`MAX_DEPTH`.  The caller closes the result, also for empty ``parts``.
    """
    if len(parts) > MAX_DEPTH:
        raise OSError(errno.ENAMETOOLONG, f"more than {MAX_DEPTH} folders deep", os.sep.join(parts))
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if part in ("", os.curdir, os.pardir) or os.sep in part:
                raise OSError(errno.EINVAL, "not a folder name", part)
            try:
                child = open_dir_at(fd, part)
            except FileNotFoundError:
                if not create:
                    raise
                # Made meanwhile by someone else: opened (and so checked) below.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = open_dir_at(fd, part)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def lexists_at(dir_fd: int, name: str) -> bool:
    """Whether ``name`` exists in ``dir_fd`` (a dangling symlink counts)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def kind_at(dir_fd: int, name: str) -> str:
    """What ``name`` in ``dir_fd`` is, in words, for messages (``a symbolic link``...)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file"
