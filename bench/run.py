"""Benchmark runner: corpus, floors, (later) dicomwatch, one Markdown table.

Usage::

    python bench/run.py --size quick            # ~300 files, about a minute
    python bench/run.py --size full             # ~3000 files
    python bench/run.py --size quick --dicomwatch-workers 1,2   # once `sort` exists

The corpus is generated under ``bench/out/`` (gitignored) on first use and reused
afterwards. Every row is one subprocess measured by :func:`bench.measure.measure`;
with ``--repeat N`` each row runs N times and the table shows the run with the median
wall time (all runs are kept in the JSON results file).

The dicomwatch rows are added in :func:`dicomwatch_measurements` -- the one place to
extend when the sorter's CLI lands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import SIZES, CorpusInfo, make_corpus
from bench.floors import (
    FLOORS,
    WARM_CACHE_NOTE,
    count_files,
    median_run,
    run_floors,
)
from bench.measure import Measurement, markdown_table, measure

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out"


@dataclass
class RunContext:
    """What every measurement needs: the corpus, a scratch dir, and run options."""

    corpus: CorpusInfo
    work: Path
    repeat: int
    keep_output: bool


# --------------------------------------------------------------------------- dicomwatch


def measure_dicomwatch_sort(ctx: RunContext, workers: int) -> Measurement:
    """Time ``dicomwatch sort INBOX --archive DST --workers N`` on a copy of the corpus.

    The sorter consumes its inbox (files are moved or deleted once filed), so it gets a
    fresh copy of ``files/`` each run, made with ``cp -r`` and ``os.sync()`` outside the
    timing; the copy is then warm in the page cache just like the floors' input.
    Run from the source tree (``python -m dicomwatch``) so no install step is needed.
    """
    inbox = ctx.work / f"dicomwatch-w{workers}-inbox"
    archive = ctx.work / f"dicomwatch-w{workers}-archive"
    for path in (inbox, archive):
        if path.exists():
            shutil.rmtree(path)
    ctx.work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(ctx.corpus.files_dir), str(inbox)], check=True)
    os.sync()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "dicomwatch", "sort", str(inbox), "--archive", str(archive)]
    cmd += ["--workers", str(workers)]
    try:
        m = measure(
            cmd,
            label=f"dicomwatch sort --workers {workers}",
            files=ctx.corpus.n_files,
            bytes_=ctx.corpus.total_bytes,
            env=env,
            cwd=REPO_ROOT,
        )
        # The archive layout is the sorter's business; count .dcm files as a sanity
        # check and keep the number with the result rather than guessing the exact tree.
        m.extra["archive_dcm_files"] = count_files(archive, ".dcm")
        m.extra["inbox_files_left"] = count_files(inbox) if inbox.exists() else 0
    finally:
        if not ctx.keep_output:
            shutil.rmtree(inbox, ignore_errors=True)
            shutil.rmtree(archive, ignore_errors=True)
    if m.extra["archive_dcm_files"] != ctx.corpus.n_files:
        print(
            f"WARNING: {m.label}: {m.extra['archive_dcm_files']} .dcm files in the archive, "
            f"corpus has {ctx.corpus.n_files}",
            file=sys.stderr,
        )
    return m


def dicomwatch_measurements(ctx: RunContext, workers_list: list[int]) -> list[list[Measurement]]:
    """>>> DICOMWATCH MEASUREMENTS GO HERE <<<

    One entry per configuration, each a list of ``ctx.repeat`` runs. Today this times
    ``dicomwatch sort`` for each ``--dicomwatch-workers`` value (none by default, until
    the ``sort`` command exists). Add further configurations (``--config`` variants,
    watch mode, ...) here as extra ``measure(...)`` calls; the table picks them up.
    """
    results: list[list[Measurement]] = []
    for workers in workers_list:
        results.append([measure_dicomwatch_sort(ctx, workers) for _ in range(ctx.repeat)])
    return results


# --------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in (
        "pydicom",
        "pylibjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-rle",
        "numpy",
        "psutil",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def decode_breakdown(m: Measurement) -> str:
    """Per-syntax decode rate from decode_only.py's own per-file timings."""
    per_ts: dict[str, dict[str, float]] = m.extra.get("per_ts", {})
    if not per_ts:
        return ""
    from pydicom.uid import UID

    lines = ["| transfer syntax | files | decode ms/file | files/s (1 core) |", "|---|--:|--:|--:|"]
    for uid, row in sorted(per_ts.items(), key=lambda kv: -kv[1]["seconds"] / kv[1]["files"]):
        per_file = row["seconds"] / row["files"]
        lines.append(
            f"| {UID(uid).name} | {int(row['files'])} | {per_file * 1000:.1f} "
            f"| {1 / per_file:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: generate/reuse the corpus, run all rows, print the table, save JSON."""
    ap = argparse.ArgumentParser(description="dicomwatch benchmark runner")
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: bench/out")
    ap.add_argument("--repeat", type=int, help="runs per row (default: 3 quick, 1 full)")
    ap.add_argument(
        "--floors",
        default=",".join(f.key for f in FLOORS),
        help="comma-separated floors to run (a,a2,b,c); empty for none",
    )
    ap.add_argument(
        "--dicomwatch-workers",
        default="",
        help="comma-separated --workers values for `dicomwatch sort` rows (default: none)",
    )
    ap.add_argument("--keep-output", action="store_true", help="keep outputs in OUT/work")
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.size == "quick" else 1)

    out = args.out.resolve()
    corpus_dir = out / f"corpus-{args.size}-seed{args.seed}"
    t0 = time.perf_counter()
    corpus = make_corpus(corpus_dir, SIZES[args.size], args.seed)
    how = "reused" if corpus.reused else f"generated in {time.perf_counter() - t0:.1f} s"
    print(f"{corpus.summary()}\n\n({how})\n")

    ctx = RunContext(corpus=corpus, work=out / "work", repeat=repeat, keep_output=args.keep_output)
    only = {k for k in args.floors.split(",") if k}
    workers_list = [int(w) for w in args.dicomwatch_workers.split(",") if w]

    load_before = os.getloadavg()
    runs = run_floors(corpus, ctx.work, only=only, keep=ctx.keep_output, repeat=repeat)
    runs += dicomwatch_measurements(ctx, workers_list)

    rows = [median_run(r) for r in runs]
    load_after = os.getloadavg()
    print(f"### {args.size}: {corpus.n_files} files, {corpus.total_bytes / 1e6:.1f} MB")
    print(
        f"(median of {repeat} run(s) per row; {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after -- anything else running "
        "on the machine skews the rows)\n"
    )
    print(markdown_table(rows))
    print(f"\n{WARM_CACHE_NOTE}")
    print(
        "peak RSS (tree) = summed RSS of the command's process tree, polled every 50 ms; "
        "max RSS (1 proc) = kernel ru_maxrss of the largest single process (floor ~7 MB, "
        "the launcher's size). CPU s = user+sys of the whole tree."
    )
    for m in rows:
        if "per_ts" in m.extra:
            print(f"\nDecode cost per transfer syntax ({m.label}):\n\n{decode_breakdown(m)}")

    results: dict[str, Any] = {
        "size": args.size,
        "seed": args.seed,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "versions": _versions(),
        "corpus": {
            "dir": str(corpus.root),
            "files": corpus.n_files,
            "bytes": corpus.total_bytes,
            "pixel_bytes": corpus.pixel_bytes,
            "by_syntax": corpus.by_syntax,
            "substitutions": corpus.substitutions,
        },
        "rows": [m.as_dict() for m in rows],
        "all_runs": [[m.as_dict() for m in r] for r in runs],
    }
    results_path = out / f"results-{args.size}.json"
    results_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
