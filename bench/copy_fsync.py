"""Durable-copy floor: copy every file of SRC into DST with one fsync per file.

Standalone (standard library only) so it can be timed as its own process. ``cp -r`` is
the I/O floor for moving the bytes, but it leaves them in the page cache; a sorter that
promises durability must fsync each filed instance (and its directory) before it
deletes or acknowledges the source. This is the smallest version of that work --
flat destination, no parsing -- so it bounds what fsync alone costs on this disk.

Usage: ``python bench/copy_fsync.py SRC DST`` (DST must not exist)

Prints one JSON line: files copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _copy(src: str, dst: str) -> None:
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = os.fstat(fin).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(fout, fin, offset, size - offset)
                if sent == 0:
                    break
                offset += sent
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="copy SRC to DST, fsync every file")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)

    os.makedirs(args.dst)
    _fsync_dir(os.path.dirname(os.path.abspath(args.dst)))
    files = 0
    with os.scandir(args.src) as it:
        entries = sorted((e.name, e.path) for e in it if e.is_file())
    for name, path in entries:
        _copy(path, os.path.join(args.dst, name))
        files += 1
    _fsync_dir(args.dst)
    print(json.dumps({"files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
