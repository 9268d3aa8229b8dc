"""Per-stage CPU cost of filing one file, against what the naive script does per file.

One process, no workers, nothing written: each stage of ``sorter._prepare`` is timed
with ``time.process_time`` over a sample of the corpus, next to pydicom's plain
``dcmread`` / ``decompress`` / ``save_as`` of the same bytes (the naive loop's steps).
Durable filing is not included; ``bench/run.py`` measures it as part of ``sort``.

Usage: ``python bench/stages.py CORPUS_FILES_DIR [--files N]``

``BENCH_DICOMWATCH_SRC=/path/to/tree`` times that tree's ``dicomwatch`` package instead
of this checkout's, for before/after comparisons of a change.

Prints one line per stage: milliseconds of CPU per file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

_SRC = os.environ.get("BENCH_DICOMWATCH_SRC")
sys.path.insert(0, str(Path(_SRC).resolve()) if _SRC else str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread  # noqa: E402

from dicomwatch import decode, dicomio  # noqa: E402
from dicomwatch.layout import DEFAULT_TEMPLATE, compile_template  # noqa: E402

LIMIT = 4 * 1024**3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="per-stage CPU ms per file")
    ap.add_argument("src", type=Path)
    ap.add_argument("--files", type=int, default=300, help="sample size, spread over the corpus")
    args = ap.parse_args(argv)
    paths = sorted(e.path for e in os.scandir(args.src) if e.is_file())
    step = max(1, len(paths) // args.files)
    sample = paths[::step][: args.files]
    keywords = compile_template(DEFAULT_TEMPLATE).keywords
    spent: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        start = time.process_time()
        value = fn(*a, **kw)
        spent[stage] += time.process_time() - start
        return value

    for path in sample:
        data = Path(path).read_bytes()
        ds = timed("dicomwatch: parse", dicomio.parse, data, max_inflated_bytes=LIMIT)
        timed("dicomwatch: completeness check", dicomio.check_complete, ds)
        timed("dicomwatch: header values for the path", dicomio.header_values, ds, keywords)
        if decode.is_compressed(ds):
            timed("dicomwatch: codestream size check", decode.check_size, ds, LIMIT)
            timed("dicomwatch: decompress", decode.decompress, ds)
        timed("dicomwatch: encode (with any read-back)", dicomio.encode, ds)

        plain = timed("naive: dcmread", dcmread, BytesIO(data), force=True)
        if plain.file_meta.TransferSyntaxUID.is_compressed:
            timed("naive: decompress", plain.decompress, generate_instance_uid=False)
        timed("naive: save_as", plain.save_as, BytesIO())

    width = max(map(len, spent))
    for side in ("dicomwatch", "naive"):
        total = 0.0
        for stage, seconds in spent.items():
            if stage.startswith(side):
                ms = seconds / len(sample) * 1000
                total += ms
                print(f"{stage:<{width}}  {ms:6.2f} ms")
        print(f"{side + ': total':<{width}}  {total:6.2f} ms")
    print(f"({len(sample)} files from {args.src}, dicomwatch from {dicomio.__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
