"""What ``dicomwatch sort`` may take: the walk over its sources, and the folders it must
never take from.

Folders are compared by device and inode as well as by path: the archive reached through
a symlink or a bind mount is still the archive, and ``sort --move`` of it would find every
file to be its own duplicate and delete it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from dicomwatch.config import INTERNAL_DIR

log = logging.getLogger(__name__)


FolderId = tuple[int, int]
"""``(st_dev, st_ino)`` of a folder: the same for every path that reaches it, whether
through a symlink or a bind mount."""


def _folder_id(path: str) -> FolderId | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _ids_upwards(path: Path) -> list[FolderId]:
    """The folder ``path`` (a file's folder, or the nearest folder that exists) and each
    of its ancestors, as ``(st_dev, st_ino)``, following ``..`` as the kernel does."""
    probe = os.path.abspath(path)
    while True:
        try:
            st = os.stat(probe)
        except OSError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return []
            probe = parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            probe = os.path.dirname(probe)
        break
    ids: list[FolderId] = []
    while len(ids) < 4096:
        try:
            st = os.stat(probe)
        except OSError:
            break
        ident = (st.st_dev, st.st_ino)
        if ids and ident == ids[-1]:
            break  # "/" is its own parent
        ids.append(ident)
        probe = os.path.join(probe, "..")
    return ids


def overlapping_source(sources: Sequence[Path], outputs: Sequence[Path]) -> str | None:
    """Why one of ``sources`` may not be sorted into ``outputs``, or None if all may.

    A source may not be an output folder, lie inside one or contain one.  Folders are
    compared by device and inode, not by path, so the archive reached through a symlink
    or a bind mount is recognised: ``sort --move`` of it would find every file to be its
    own duplicate and delete it.  An output that does not exist yet is checked through
    its nearest existing ancestor (a source may not contain that place either).
    """
    for source in sources:
        up_source = _ids_upwards(source)
        if not up_source:
            continue
        source_is_dir = os.path.isdir(source)
        for out in outputs:
            out_exists = os.path.isdir(out)
            up_out = _ids_upwards(out)
            if not up_out:
                continue
            if out_exists and up_out[0] in up_source:
                if source_is_dir and up_source[0] == up_out[0]:
                    return f"{source} is {out} (the same folder under another path)"
                return f"{source} is inside {out}"
            if source_is_dir and up_source[0] in up_out:
                return f"{source} contains {out}"
    return None


def walk_files(sources: Sequence[Path], skip: Sequence[Path]) -> Iterator[Path]:
    """Every regular file below ``sources``, lazily; never follows links or enters ``skip``
    (recognised by path and by device and inode, so also through a bind mount)."""
    skip_real = {os.path.realpath(p) for p in skip}
    skip_ids = {ident for ident in (_folder_id(os.fspath(p)) for p in skip) if ident}
    for source in sources:
        st = os.lstat(source)
        if stat.S_ISREG(st.st_mode):
            yield source
            continue
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d != INTERNAL_DIR
                and os.path.realpath(os.path.join(dirpath, d)) not in skip_real
                and _folder_id(os.path.join(dirpath, d)) not in skip_ids
            )
            for name in sorted(filenames):
                path = Path(dirpath, name)
                try:
                    mode = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(mode):
                    yield path
                else:
                    log.warning("skipped %s: not a regular file", path)
