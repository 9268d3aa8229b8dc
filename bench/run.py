"""Benchmark runner: corpus, floors, ``dicomwatch sort``, ``dicomwatch run``, one report.

Usage::

    python bench/run.py --size quick            # ~300 files, a few minutes
    python bench/run.py --size full             # ~3000 files, about 15 minutes
    python bench/run.py --size quick --skip-daemon --dicomwatch-workers 1,2

One command measures everything on the same corpus, in this order:

1. the floors (``cp -r``, copy + fsync, decode only, naive sort) and ``dicomwatch sort``
   with ``--workers 1`` and with the default workers (``--workers`` omitted: one per
   core), on the whole corpus;
2. the same rows on its compressed part only (a sibling folder of hard links to the
   compressed files, ``corpus-...-compressed/``), where decoding dominates and the
   "cores x decode only" bound is meaningful;
3. the ratios the targets are stated in (sort / naive, sort / (cores x decode only));
4. the daemon (:mod:`bench.daemon_bench`): latency per drop mode at 50 files/s,
   sustained throughput against ``dicomwatch sort``, and the 100,000-file backlog --
   unless ``--skip-daemon``.

The corpus is generated under ``bench/out/`` (gitignored) on first use and reused
afterwards. Every batch row is one subprocess measured by :func:`bench.measure.measure`;
with ``--repeat N`` the rows run round-robin N times (each round runs every row once,
so a machine whose speed drifts during the run affects all rows alike) and the table
shows each row's run with the median wall time (all runs are kept in the JSON results
file). Every row records the 1-minute
load average it started under.
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
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import MANIFEST_NAME, SIZES, CorpusInfo, make_corpus
from bench.daemon_bench import (
    BACKLOG_FILES,
    dicomwatch_env,
    dicomwatch_src,
    run_daemon_bench,
    steady_rate,
)
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


def measure_dicomwatch_sort(
    ctx: RunContext, workers: int | None, corpus: CorpusInfo | None = None
) -> Measurement:
    """Time ``dicomwatch sort INBOX --archive DST [--workers N]`` on a copy of the corpus.

    ``workers=None`` omits ``--workers``: the default, one worker per usable core.
    The sorter consumes its inbox (files are moved or deleted once filed), so it gets a
    fresh copy of ``files/`` each run, made with ``cp -r`` and ``os.sync()`` outside the
    timing; the copy is then warm in the page cache just like the floors' input.
    Run from the source tree (``python -m dicomwatch``) so no install step is needed.
    A config file puts the quarantine in the scratch folder too (the built-in default
    is ``./quarantine``), and the JSON-lines log is kept so the steady-state rate (first
    to last filed file, start-up excluded) can be compared with the daemon's.
    """
    corpus = corpus or ctx.corpus
    tag = "default" if workers is None else f"w{workers}"
    base = ctx.work / f"dicomwatch-{tag}"
    inbox, archive, quarantine = base / "inbox", base / "archive", base / "quarantine"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(corpus.files_dir), str(inbox)], check=True)
    config = base / "config.yaml"
    config.write_text(f"quarantine: {json.dumps(str(quarantine))}\nlog_format: json\n")
    log_path = base.parent / f"dicomwatch-{tag}.log"
    os.sync()

    env = dicomwatch_env()
    cmd = [sys.executable, "-m", "dicomwatch", "sort", str(inbox), "--archive", str(archive)]
    cmd += ["--config", str(config)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    label = (
        f"dicomwatch sort --workers {workers}"
        if workers is not None
        else f"dicomwatch sort (default: {len(os.sched_getaffinity(0))} workers)"
    )
    try:
        m = measure(
            cmd,
            label=label,
            files=corpus.n_files,
            bytes_=corpus.total_bytes,
            env=env,
            cwd=dicomwatch_src(),
            keep_stderr=log_path,
        )
        # The archive layout is the sorter's business; count .dcm files as a sanity
        # check and keep the number with the result rather than guessing the exact tree.
        m.extra["archive_dcm_files"] = count_files(archive, ".dcm")
        m.extra["inbox_files_left"] = count_files(inbox) if inbox.exists() else 0
        m.extra["workers"] = workers
        m.extra["steady_files_per_s"] = steady_rate(_file_record_times(log_path))
    finally:
        if not ctx.keep_output:
            shutil.rmtree(base, ignore_errors=True)
    if m.extra["archive_dcm_files"] != corpus.n_files:
        raise RuntimeError(
            f"{m.label}: {m.extra['archive_dcm_files']} .dcm files in the archive, "
            f"corpus has {corpus.n_files}"
        )
    return m


def _file_record_times(log_path: Path) -> list[float]:
    """``time`` of every ``file`` record in a JSON-lines log (epoch seconds)."""
    from datetime import datetime

    times = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"event": "file"' not in line:
            continue
        try:
            times.append(datetime.fromisoformat(json.loads(line)["time"]).timestamp())
        except (ValueError, KeyError):
            continue
    return times


def parse_workers(text: str) -> list[int | None]:
    """``1,default,2`` -> [1, None, 2]; ``default`` (or ``0``) means ``--workers`` omitted."""
    out: list[int | None] = []
    for item in (w.strip() for w in text.split(",")):
        if not item:
            continue
        out.append(None if item in ("default", "0") else int(item))
    return out


def dicomwatch_measurements(
    ctx: RunContext, workers_list: list[int | None], corpus: CorpusInfo | None = None
) -> list[list[Measurement]]:
    """The ``dicomwatch sort`` rows: one entry per configuration, ``ctx.repeat`` runs each.

    Add further configurations (``--config`` variants, ...) here as extra ``measure``
    calls; the table picks them up.
    """
    results: list[list[Measurement]] = []
    for workers in workers_list:
        results.append([measure_dicomwatch_sort(ctx, workers, corpus) for _ in range(ctx.repeat)])
    return results


def compressed_subset(corpus: CorpusInfo) -> CorpusInfo:
    """The compressed files of ``corpus`` in a sibling folder, as hard links.

    Decoding is the work the CPU floor measures; uncompressed files are almost free to
    decode and would flatter or hide the sorter's own overhead, so the per-core ratio is
    also reported on this part alone.  Hard links share the page cache with the corpus
    (no extra memory, no extra disk); the folder is rebuilt when its file list differs.
    """
    from pydicom.uid import UID

    root = corpus.root.with_name(corpus.root.name + "-compressed")
    files_dir = root / corpus.files_dir.name
    rows = [f for f in corpus.files if UID(f["transfer_syntax"]).is_compressed]
    want = {f["name"]: f["bytes"] for f in rows}
    try:
        have = {e.name: e.stat().st_size for e in os.scandir(files_dir)}
    except FileNotFoundError:
        have = {}
    if have != want:
        if root.exists():
            shutil.rmtree(root)
        files_dir.mkdir(parents=True)
        for name in want:
            try:
                os.link(corpus.files_dir / name, files_dir / name)
            except OSError:
                shutil.copy2(corpus.files_dir / name, files_dir / name)
    by_syntax = {uid: row for uid, row in corpus.by_syntax.items() if UID(uid).is_compressed}
    manifest = json.loads(corpus.manifest_path.read_text())
    manifest.update(
        n_files=len(rows),
        total_bytes=sum(want.values()),
        pixel_bytes=sum(int(r["pixel_bytes"]) for r in by_syntax.values()),
        by_syntax=by_syntax,
        files=rows,
        subset_of=str(corpus.root),
    )
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return CorpusInfo.load(root)


def ratios(rows: list[Measurement], cores: int) -> list[dict[str, Any]]:
    """The target ratios from one corpus part's rows (matched by label)."""

    def find(prefix: str) -> Measurement | None:
        return next((m for m in rows if m.label.startswith(prefix)), None)

    naive = find("(c)")
    decode = find("(b)")
    fsync_floor = find("(a2)")
    out: list[dict[str, Any]] = []
    for m in rows:
        if not m.label.startswith("dicomwatch sort"):
            continue
        # N workers can at best decode N times as fast as one process -- up to the
        # number of cores: a third worker on two cores adds no decoding capacity.
        lanes = min(m.extra.get("workers") or cores, cores)
        entry: dict[str, Any] = {"label": m.label, "files_per_s": m.files_per_s}
        if naive:
            entry["vs_naive"] = m.files_per_s / naive.files_per_s
        if decode:
            entry["vs_decode_x_workers"] = m.files_per_s / (lanes * decode.files_per_s)
            entry["decode_bound_files_per_s"] = lanes * decode.files_per_s
        if fsync_floor:
            entry["vs_copy_fsync"] = m.files_per_s / fsync_floor.files_per_s
        out.append(entry)
    return out


def ratio_table(parts: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| corpus | row | files/s | x naive (c) | / (min(workers, cores) x decode only (b)) "
        "| / copy+fsync (a2) |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for part, entries in parts.items():
        for e in entries:
            lines.append(
                f"| {part} | {e['label']} | {e['files_per_s']:.1f} "
                f"| {e.get('vs_naive', float('nan')):.2f}x "
                f"| {e.get('vs_decode_x_workers', float('nan')):.0%} "
                f"| {e.get('vs_copy_fsync', float('nan')):.0%} |"
            )
    return "\n".join(lines)


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


def wait_until_quiet(threshold: float, max_minutes: float, every_s: float = 30.0) -> float:
    """Poll the 1-minute load average until it is below ``threshold`` (or time runs out).

    The machine may be shared; measuring while something else runs skews every row.
    Returns the load average measuring starts under.
    """
    deadline = time.monotonic() + max_minutes * 60
    while True:
        load1 = os.getloadavg()[0]
        if load1 < threshold or time.monotonic() >= deadline:
            if load1 >= threshold:
                print(f"machine still busy (load {load1:.2f}); measuring anyway", flush=True)
            return load1
        print(f"waiting for a quiet machine: load {load1:.2f} >= {threshold}", flush=True)
        time.sleep(every_s)


def measure_part(
    ctx: RunContext, corpus: CorpusInfo, only: set[str], workers_list: list[int | None]
) -> list[list[Measurement]]:
    """Floors and sort rows on one corpus part, ``ctx.repeat`` rounds of every row."""
    once = replace(ctx, repeat=1)
    rows: list[list[Measurement]] = []
    for _ in range(ctx.repeat):
        runs = run_floors(corpus, ctx.work, only=only, keep=ctx.keep_output, repeat=1)
        runs += dicomwatch_measurements(once, workers_list, corpus)
        if not rows:
            rows = [[] for _ in runs]
        for row, run in zip(rows, runs, strict=True):
            row.extend(run)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: generate/reuse the corpus, run all rows, print the tables, save JSON."""
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
        default="1,default",
        help="`dicomwatch sort` rows: comma-separated --workers values, 'default' = option "
        "omitted (default: 1,default; empty for none)",
    )
    ap.add_argument(
        "--parts",
        default="all,compressed",
        help="corpus parts for the batch rows: all (every file), compressed (compressed "
        "files only); default both",
    )
    ap.add_argument("--skip-daemon", action="store_true", help="no `dicomwatch run` figures")
    ap.add_argument("--daemon-rate", type=float, default=50.0, help="latency drop rate, files/s")
    ap.add_argument(
        "--daemon-files", type=int, default=600, help="files per latency mode (max: corpus)"
    )
    ap.add_argument("--backlog-files", type=int, default=BACKLOG_FILES, help="0: no backlog run")
    ap.add_argument(
        "--backlog-seconds", type=float, default=60.0, help="stop the backlog run after this"
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        metavar="LOAD",
        help="first wait (up to --wait-quiet-minutes) until the 1-minute load is below LOAD",
    )
    ap.add_argument("--wait-quiet-minutes", type=float, default=25.0)
    ap.add_argument("--keep-output", action="store_true", help="keep outputs in OUT/work")
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.size == "quick" else 1)

    out = args.out.resolve()
    corpus_dir = out / f"corpus-{args.size}-seed{args.seed}"
    t0 = time.perf_counter()
    corpus = make_corpus(corpus_dir, SIZES[args.size], args.seed)
    how = "reused" if corpus.reused else f"generated in {time.perf_counter() - t0:.1f} s"
    print(f"{corpus.summary()}\n\n({how})\n", flush=True)

    ctx = RunContext(corpus=corpus, work=out / "work", repeat=repeat, keep_output=args.keep_output)
    only = {k for k in args.floors.split(",") if k}
    workers_list = parse_workers(args.dicomwatch_workers)
    part_names = [p for p in args.parts.split(",") if p]
    parts: dict[str, CorpusInfo] = {}
    for name in part_names:
        if name == "all":
            parts[name] = corpus
        elif name == "compressed":
            parts[name] = compressed_subset(corpus)
        else:
            ap.error(f"unknown corpus part {name!r}")
    cores = len(os.sched_getaffinity(0))

    if args.wait_quiet is not None:
        wait_until_quiet(args.wait_quiet, args.wait_quiet_minutes)
    load_before = os.getloadavg()
    part_runs: dict[str, list[list[Measurement]]] = {}
    part_rows: dict[str, list[Measurement]] = {}
    for name, part in parts.items():
        print(f"measuring batch rows on {name} ({part.n_files} files)...", flush=True)
        part_runs[name] = measure_part(ctx, part, only, workers_list)
        part_rows[name] = [median_run(r) for r in part_runs[name]]
    load_after_batch = os.getloadavg()

    daemon = None
    if not args.skip_daemon:
        daemon = run_daemon_bench(
            corpus.files_dir,
            ctx.work,
            out,
            rate=args.daemon_rate,
            latency_files=args.daemon_files,
            backlog_files=args.backlog_files,
            backlog_seconds=args.backlog_seconds,
            keep=ctx.keep_output,
            progress=lambda msg: print(msg, flush=True),
        )
        sort_default = next(
            (m for m in part_rows.get("all", []) if m.extra.get("workers", 0) is None), None
        )
        if sort_default is not None:
            daemon.sort_steady_files_per_s = sort_default.extra.get("steady_files_per_s")
            daemon.sort_wall_files_per_s = sort_default.files_per_s
    load_after = os.getloadavg()

    print(
        f"\n(median of {repeat} run(s) per row; {cores} CPUs; load average "
        f"{load_before[0]:.2f} before, {load_after_batch[0]:.2f} after the batch rows, "
        f"{load_after[0]:.2f} at the end -- anything else running on the machine skews "
        "the rows)"
    )
    for name, rows in part_rows.items():
        part = parts[name]
        print(
            f"\n### {args.size}, {name} files: {part.n_files} files, "
            f"{part.total_bytes / 1e6:.1f} MB\n"
        )
        print(markdown_table(rows))
    print(f"\n{WARM_CACHE_NOTE}")
    print(
        "peak RSS (tree) = summed RSS of the command's process tree, polled every 50 ms; "
        "max RSS (1 proc) = kernel ru_maxrss of the largest single process (floor ~7 MB, "
        "the launcher's size). CPU s = user+sys of the whole tree."
    )
    ratio_parts = {name: ratios(rows, cores) for name, rows in part_rows.items()}
    if any(ratio_parts.values()):
        print(f"\n### Ratios ({cores} cores)\n\n{ratio_table(ratio_parts)}")
    for name, rows in part_rows.items():
        for m in rows:
            if "per_ts" in m.extra:
                print(
                    f"\nDecode cost per transfer syntax ({name} files, {m.label}):\n\n"
                    f"{decode_breakdown(m)}"
                )
    if daemon is not None:
        print(f"\n### dicomwatch run ({args.size} corpus)\n\n{daemon.markdown()}")

    results: dict[str, Any] = {
        "size": args.size,
        "seed": args.seed,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "cores": cores,
        "loadavg_before": load_before,
        "loadavg_after_batch": load_after_batch,
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
        "parts": {
            name: {
                "files": parts[name].n_files,
                "bytes": parts[name].total_bytes,
                "rows": [m.as_dict() for m in rows],
                "all_runs": [[m.as_dict() for m in r] for r in part_runs[name]],
                "ratios": ratio_parts[name],
            }
            for name, rows in part_rows.items()
        },
        "daemon": daemon.as_dict() | {"throughput_ratio": daemon.throughput_ratio()}
        if daemon is not None
        else None,
    }
    results_path = out / f"results-{args.size}.json"
    results_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
