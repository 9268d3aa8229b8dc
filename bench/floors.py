"""The "floor" measurements: what the hardware and the libraries allow, sorter aside.

Each floor runs as its own subprocess through :func:`bench.measure.measure`, on the
flat ``files/`` folder of a corpus made by ``bench/corpus.py``:

(a)  ``cp -r SRC DST`` -- the I/O floor: the same bytes copied, nothing parsed, nothing
     synced. No sorter can file the corpus faster than this on this disk.
(a2) ``copy_fsync.py`` -- the same copy with one fsync per file plus the directory: the
     I/O floor for a *durable* sorter (extra to the original three; a sorter that
     fsyncs should be compared with this, not with bare ``cp``).
(b)  ``decode_only.py`` -- one process reads and decodes every file, writes nothing:
     the CPU floor per core. With N workers a sorter can at best approach N times it.
(c)  ``naive_sort.py`` -- the classic one-process sort script: read, build the path,
     decompress, ``save_as``; no fsync. The baseline to beat.

Fairness: the corpus is read once before the first measurement and never dropped from
the page cache, so every row reads from a warm cache (none pays for cold disk reads).
``os.sync()`` runs before each row, outside the timing, so dirty pages written by the
previous row are not flushed on the next row's clock. Outputs are deleted after each
row (outside the timing) unless asked to keep them.

CLI: ``python bench/floors.py CORPUS_DIR [--work DIR] [--only a,b,c] [--keep-output]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/floors.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import CorpusInfo
from bench.measure import Measurement, markdown_table, measure

BENCH_DIR = Path(__file__).resolve().parent
PY = sys.executable

WARM_CACHE_NOTE = (
    "All rows read a corpus that is warm in the page cache (read once before the first "
    "row, nothing dropped); os.sync() runs before each row, outside the timing; only the "
    "fsync row makes its output durable. MB/s is input corpus bytes (10^6) per second."
)


def warm_page_cache(files_dir: Path) -> int:
    """Read every corpus file once so all measurements start equally warm; returns bytes."""
    total = 0
    for entry in os.scandir(files_dir):
        with open(entry.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    return total


def count_files(root: Path, suffix: str = "") -> int:
    """Regular files under *root* (recursively) whose name ends with *suffix*."""
    n = 0
    for _dirpath, _dirnames, filenames in os.walk(root):
        n += sum(1 for f in filenames if f.endswith(suffix))
    return n


def _fresh(path: Path) -> Path:
    """Make sure *path* does not exist (previous run's output) and its parent does."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _json_tail(m: Measurement) -> dict[str, object]:
    """The scripts print one JSON summary line last; keep it with the measurement."""
    for line in reversed(m.stdout_tail.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return {}


def _check_output(m: Measurement, dst: Path, expected: int, suffix: str = "") -> None:
    """A floor that silently filed fewer files would look faster; refuse that."""
    found = count_files(dst, suffix)
    m.extra["output_files"] = found
    if found != expected:
        raise RuntimeError(f"{m.label}: expected {expected} output files in {dst}, found {found}")


def _finish(dst: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(dst, ignore_errors=True)


def floor_copy(corpus: CorpusInfo, work: Path, *, keep: bool = False) -> Measurement:
    """(a) ``cp -r SRC DST``: the I/O floor."""
    dst = _fresh(work / "cp")
    os.sync()
    m = measure(
        ["cp", "-r", corpus.files_dir, dst],
        label="(a) cp -r (I/O floor)",
        files=corpus.n_files,
        bytes_=corpus.total_bytes,
    )
    _check_output(m, dst, corpus.n_files)
    _finish(dst, keep)
    return m


def floor_copy_fsync(corpus: CorpusInfo, work: Path, *, keep: bool = False) -> Measurement:
    """(a2) copy with fsync per file: the I/O floor of a durable sorter."""
    dst = _fresh(work / "copy-fsync")
    os.sync()
    m = measure(
        [PY, BENCH_DIR / "copy_fsync.py", corpus.files_dir, dst],
        label="(a2) copy + fsync per file (durable I/O floor)",
        files=corpus.n_files,
        bytes_=corpus.total_bytes,
    )
    m.extra.update(_json_tail(m))
    _check_output(m, dst, corpus.n_files)
    _finish(dst, keep)
    return m


def floor_decode(
    corpus: CorpusInfo, work: Path, *, keep: bool = False, mode: str = "pixel_array"
) -> Measurement:
    """(b) decode every file in one process, write nothing: the CPU floor per core."""
    del work, keep  # writes nothing
    os.sync()
    m = measure(
        [PY, BENCH_DIR / "decode_only.py", corpus.files_dir, "--mode", mode],
        label=f"(b) decode only, 1 process ({mode})",
        files=corpus.n_files,
        bytes_=corpus.total_bytes,
    )
    m.extra.update(_json_tail(m))
    if m.extra.get("files") != corpus.n_files:
        raise RuntimeError(f"{m.label}: decoded {m.extra.get('files')} of {corpus.n_files}")
    return m


def floor_naive(corpus: CorpusInfo, work: Path, *, keep: bool = False) -> Measurement:
    """(c) the classic one-process sort script (decompress + save_as, no fsync)."""
    dst = _fresh(work / "naive")
    os.sync()
    m = measure(
        [PY, BENCH_DIR / "naive_sort.py", corpus.files_dir, dst],
        label="(c) naive classic sort, 1 process",
        files=corpus.n_files,
        bytes_=corpus.total_bytes,
    )
    m.extra.update(_json_tail(m))
    _check_output(m, dst, corpus.n_files, ".dcm")
    _finish(dst, keep)
    return m


@dataclass(frozen=True)
class Floor:
    """A named floor; *run* takes (corpus, work dir, keep=...) and returns a Measurement."""

    key: str
    run: Callable[..., Measurement]


FLOORS: tuple[Floor, ...] = (
    Floor("a", floor_copy),
    Floor("a2", floor_copy_fsync),
    Floor("b", floor_decode),
    Floor("c", floor_naive),
)


def run_floors(
    corpus: CorpusInfo,
    work: Path,
    *,
    only: set[str] | None = None,
    keep: bool = False,
    repeat: int = 1,
) -> list[list[Measurement]]:
    """Warm the cache, then run each selected floor *repeat* times (one list per floor)."""
    warm_page_cache(corpus.files_dir)
    results: list[list[Measurement]] = []
    for floor in FLOORS:
        if only is not None and floor.key not in only:
            continue
        results.append([floor.run(corpus, work, keep=keep) for _ in range(repeat)])
    return results


def median_run(runs: list[Measurement]) -> Measurement:
    """The run with the median wall time (the lower middle one for even counts)."""
    ordered = sorted(runs, key=lambda m: m.seconds)
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    """CLI: run the floors on an existing corpus and print the table."""
    ap = argparse.ArgumentParser(description="measure the floors on a corpus")
    ap.add_argument("corpus", type=Path, help="corpus directory (holds corpus.json, files/)")
    ap.add_argument("--work", type=Path, help="scratch dir for outputs (default CORPUS/../work)")
    ap.add_argument("--only", help="comma-separated subset of: a,a2,b,c")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep-output", action="store_true")
    args = ap.parse_args(argv)

    corpus = CorpusInfo.load(args.corpus.resolve())
    work = (args.work or corpus.root.parent / "work").resolve()
    only = set(args.only.split(",")) if args.only else None
    runs = run_floors(corpus, work, only=only, keep=args.keep_output, repeat=args.repeat)
    print(markdown_table([median_run(r) for r in runs]))
    print(f"\n{WARM_CACHE_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
