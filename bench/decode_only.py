"""Decode-only floor: read and decompress every file in a folder, write nothing.

Standalone on purpose (only pydicom, no bench or dicomwatch imports) so it can be timed
as its own process. One process, one core: this is the CPU floor per core for turning
the corpus into pixels; a sorter that decompresses cannot beat
``files / this time * workers`` however clever its I/O is.

Usage: ``python bench/decode_only.py SRC [--mode pixel_array|decompress]``

``pixel_array`` (default) is the pure decode into a NumPy array. ``decompress`` runs
``ds.decompress(generate_instance_uid=False)``, which additionally rebuilds Pixel Data
bytes and the file meta, as a sorter that stores uncompressed would.

Prints one JSON line: files, errors, and decode seconds per transfer syntax (timed
in-process, per file, dcmread included) so the cost can be attributed to codecs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

from pydicom import dcmread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="decode every DICOM file in SRC, write nothing")
    ap.add_argument("src")
    ap.add_argument("--mode", choices=["pixel_array", "decompress"], default="pixel_array")
    args = ap.parse_args(argv)

    per_ts: dict[str, dict[str, float]] = defaultdict(lambda: {"files": 0, "seconds": 0.0})
    files = errors = 0
    with os.scandir(args.src) as it:
        paths = sorted(e.path for e in it if e.is_file())
    for path in paths:
        t0 = time.perf_counter()
        try:
            ds = dcmread(path)
            ts = str(ds.file_meta.TransferSyntaxUID)
            if args.mode == "pixel_array":
                _ = ds.pixel_array
            elif ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            errors += 1
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        row = per_ts[ts]
        row["files"] += 1
        row["seconds"] += time.perf_counter() - t0
        files += 1
    print(json.dumps({"files": files, "errors": errors, "mode": args.mode, "per_ts": per_ts}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
