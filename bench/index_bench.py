"""What the archive index costs and how fast it answers.

Three measurements, printed as Markdown for docs/BENCHMARKS.md:

1. ``dicomwatch sort`` of the generated corpus (bench/corpus.py) with ``index: sqlite``
   against ``index: none``, alternating runs;
2. query latency on an SQLite index of ``--rows`` synthesised instances (default one
   million; 100 per series, 5 series per study, 2 studies per patient): ``find
   --sop-instance-uid``, ``find --patient-id`` and ``series --study-instance-uid``, each
   as the command's own run time in a warm process (median of 25 keys) and as a whole
   ``dicomwatch ...`` process (median of 5);
3. ``dicomwatch index rebuild`` of an archive of ``--rebuild-files`` small instances.

Usage::

    python bench/index_bench.py [--size quick|full] [--rows N] [--rebuild-files N]
                                [--repeat N] [--out bench/out/index]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dicomwatch import cli  # noqa: E402
from dicomwatch.config import config_from_mapping  # noqa: E402
from dicomwatch.indexdb import InstanceRow, open_index, utc_text  # noqa: E402


def write_config(root: Path, index: str, **extra: Any) -> Path:
    values = {
        "inbox": str(root / "inbox"),
        "archive": str(root / "archive"),
        "quarantine": str(root / "quarantine"),
        "state_dir": str(root / "state"),
        "index": index,
        "log_level": "WARNING",
        **extra,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def dw(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dicomwatch", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- 1. sort


def bench_sort(out: Path, size: str, repeat: int) -> list[str]:
    corpus = out / f"corpus-{size}"
    subprocess.run(
        [sys.executable, str(HERE / "corpus.py"), str(corpus), "--size", size], check=True
    )
    files = corpus / "files"
    count = sum(1 for _ in files.iterdir())
    times: dict[str, list[float]] = {"sqlite": [], "none": []}
    for _ in range(repeat):
        for mode in ("none", "sqlite"):
            root = out / f"sort-{mode}"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            config = write_config(root, mode)
            times[mode].append(dw("sort", "--config", str(config), "--no-progress", str(files)))
    lines = [
        f"`dicomwatch sort` of the {size} corpus ({count} files), {repeat} alternating runs each:",
        "",
        "| index | median s | files/s | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for mode, runs in times.items():
        med = statistics.median(runs)
        lines.append(
            f"| `{mode}` | {med:.2f} | {count / med:.1f} | {', '.join(f'{t:.2f}' for t in runs)} |"
        )
    ratio = statistics.median(times["sqlite"]) / statistics.median(times["none"])
    lines += ["", f"sqlite / none: {ratio:.3f}x the time."]
    return lines


# ----------------------------------------------------------------------------- 2. queries


def synthesise(config: Path, rows: int) -> tuple[float, list[str], list[str], list[str]]:
    cfg = config_from_mapping(yaml.safe_load(config.read_text()), source=str(config))
    batch: list[InstanceRow] = []
    sops: list[str] = []
    patients: list[str] = []
    studies: list[str] = []
    started = time.perf_counter()
    base = time.time() - rows / 100
    with open_index(cfg) as ix:
        for n in range(rows):
            series, study, patient = n // 100, n // 500, n // 1000
            sop = f"1.2.826.0.1.99.{n}"
            batch.append(
                InstanceRow(
                    sop_instance_uid=sop,
                    path=f"P{patient:07d}/ST{study}/SE{series}/CT.{n % 100}.dcm",
                    series_instance_uid=f"1.2.826.0.1.98.{series}",
                    study_instance_uid=f"1.2.826.0.1.97.{study}",
                    patient_id=f"P{patient:07d}",
                    modality="CT",
                    study_date="20240101",
                    series_number=str(series % 5 + 1),
                    instance_number=str(n % 100 + 1),
                    size=525_000,
                    sha256=f"{n:064x}",
                    transfer_syntax="1.2.840.10008.1.2.1",
                    source=f"/srv/dicomwatch/inbox/f{n:08d}",
                    outcome="sorted",
                    node="bench",
                    time=utc_text(datetime.fromtimestamp(base + n / 100, UTC)),
                )
            )
            if n % 997 == 0:
                sops.append(sop)
            if n % 100_003 == 0 or (len(patients) < 25 and n % 9973 == 0):
                patients.append(f"P{patient:07d}")
                studies.append(f"1.2.826.0.1.97.{study}")
            if len(batch) == 50_000:
                ix.write(batch)
                batch.clear()
        ix.write(batch)
    return time.perf_counter() - started, sops, patients, studies


def in_process(argv: list[str]) -> float:
    sink = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        code = cli.main(argv)
    elapsed = time.perf_counter() - started
    assert code == 0 and sink.getvalue(), argv
    return elapsed


def bench_queries(out: Path, rows: int) -> list[str]:
    root = out / "queries"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = write_config(root, "sqlite")
    load, sops, patients, studies = synthesise(config, rows)
    db = root / "state" / "index.sqlite3"
    size_mb = sum(p.stat().st_size for p in db.parent.glob("index.sqlite3*")) / 1e6
    rng = random.Random(1)
    cases = {
        "find --sop-instance-uid": ("find", "--sop-instance-uid", sops),
        "find --patient-id": ("find", "--patient-id", patients),
        "series --study-instance-uid": ("series", "--study-instance-uid", studies),
    }
    lines = [
        f"An SQLite index of {rows:,} synthesised instances ({rows // 100:,} series, "
        f"{rows // 500:,} studies, {rows // 1000:,} patients; {size_mb:.0f} MB), loaded in "
        f"{load:.1f} s ({rows / load:,.0f} rows/s, 50,000 rows per transaction):",
        "",
        "| command | rows out | warm process: median ms (max) | whole process: median ms |",
        "|---|---:|---:|---:|",
    ]
    for label, (command, flag, keys) in cases.items():
        warm = []
        in_process([command, "--config", str(config), "--json", flag, keys[0]])
        for key in rng.sample(keys, min(25, len(keys))):
            warm.append(in_process([command, "--config", str(config), "--json", flag, key]))
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            cli.main([command, "--config", str(config), "--json", flag, keys[0]])
        n_out = len(sink.getvalue().splitlines())
        whole = [dw(command, "--config", str(config), "--json", flag, k) for k in keys[:5]]
        lines.append(
            f"| `{label}` | {n_out} | {statistics.median(warm) * 1000:.1f} "
            f"({max(warm) * 1000:.1f}) | {statistics.median(whole) * 1000:.0f} |"
        )
    return lines


# ----------------------------------------------------------------------------- 3. rebuild


def bench_rebuild(out: Path, files: int) -> list[str]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_dataset

    root = out / "rebuild"
    shutil.rmtree(root, ignore_errors=True)
    archive = root / "archive"
    started = time.perf_counter()
    for n in range(files):
        ds = build_dataset(
            seed=n,
            rows=64,
            columns=64,
            PatientID=f"P{n // 1000:05d}",
            SeriesInstanceUID=f"1.2.826.0.1.98.{n // 100}",
            StudyInstanceUID=f"1.2.826.0.1.97.{n // 500}",
            InstanceNumber=n % 100 + 1,
        )
        folder = archive / f"P{n // 1000:05d}" / f"ST{n // 500}" / f"SE{n // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"CT.{n % 100 + 1}.dcm", enforce_file_format=True)
    made = time.perf_counter() - started
    config = write_config(root, "sqlite")
    total_bytes = sum(p.stat().st_size for p in archive.rglob("*.dcm"))
    subprocess.run(["sync"], check=False)
    cold = dw("index", "rebuild", "--config", str(config))
    os.unlink(root / "state" / "index.sqlite3")
    again = dw("index", "rebuild", "--config", str(config))
    check = dw("index", "check", "--config", str(config))
    return [
        f"`dicomwatch index rebuild` of an archive of {files:,} files "
        f"({total_bytes / 1e6:.0f} MB, 64x64 CT, made in {made:.0f} s, in the page cache), "
        "into an empty index, whole command:",
        "",
        "| run | s | files/s |",
        "|---|---:|---:|",
        f"| first | {cold:.1f} | {files / cold:,.0f} |",
        f"| second (new index) | {again:.1f} | {files / again:,.0f} |",
        f"| `index check` afterwards | {check:.1f} | {files / check:,.0f} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["quick", "full"], default="quick")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rebuild-files", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "index")
    ap.add_argument("--only", choices=["sort", "queries", "rebuild"], action="append")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["sort", "queries", "rebuild"]
    report: list[str] = []
    if "sort" in parts:
        report += [*bench_sort(args.out, args.size, args.repeat), ""]
    if "queries" in parts:
        report += [*bench_queries(args.out, args.rows), ""]
    if "rebuild" in parts:
        report += [*bench_rebuild(args.out, args.rebuild_files), ""]
    print("\n".join(report))


if __name__ == "__main__":
    main()
