"""Which kind of filesystem a folder is on, for refusing to keep SQLite on a network share.

SQLite's locking (and WAL's shared memory) relies on POSIX locks and ``mmap`` behaving
as on a local disk; NFS, SMB/CIFS and most FUSE filesystems do not give that, and a
corrupt index is the result.  ``statfs(2)`` names the filesystem by a magic number;
:func:`network_filesystem` is the pure decision on that number, so it is tested
without mounting anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any

NFS_MAGIC = 0x6969
SMB_MAGIC = 0x517B
CIFS_MAGIC = 0xFF534D42
SMB2_MAGIC = 0xFE534D42
FUSE_MAGIC = 0x65735546

_NETWORK = {
    NFS_MAGIC: "NFS",
    SMB_MAGIC: "SMB",
    CIFS_MAGIC: "CIFS",
    SMB2_MAGIC: "SMB2",
    FUSE_MAGIC: "FUSE",
}


def network_filesystem(magic: int) -> str | None:
    """The name of a filesystem SQLite must not live on, or None for a local one."""
    return _NETWORK.get(magic & 0xFFFFFFFF)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first field, a long.  The rest is
    # room enough for the kernel to write into (120 bytes on x86-64 and arm64).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc: Any = None


def filesystem_magic(path: Path) -> int | None:
    """``statfs(path).f_type``, or None where it cannot be asked (not Linux, no libc)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _libc.statfs  # noqa: B018 - probe the symbol
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return None
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF
