"""Daemon benchmark: ``dicomwatch run`` latency, sustained throughput, 100,000-file backlog.

Three measurements, each against a real ``dicomwatch run`` subprocess with its own
config in a scratch folder (``settle_seconds: 2``, the default; JSON-lines log to a
file; workers left at the default, one per core):

1. **Latency at a steady rate.**  Corpus files are dropped into the inbox at
   ``--rate`` files/s (default 50) in three ways a sender delivers files:

   * ``copy``: create, write, close (``cp``, ``storescp``); one close-write event.
   * ``slow``: each file written in 4 chunks spread over ~0.5 s, the file kept open
     in between (a slow network sender); only the last chunk is followed by a close.
   * ``rename``: written under a hidden temporary name (ignored by the default
     ``.*`` pattern), then renamed to its final name (``rsync``, ``scp``-style tools).

   Latency per file is from the moment the dropper finished with it (``time.time()``
   after the last write and close, or after the rename) to the ``time`` of the
   daemon's ``file`` log record.  The daemon writes that record in its main process
   right after the worker reports the archive copy durable (fsync of file and folder),
   so it marks when the file is safely in the archive.  Record times have millisecond
   resolution.  The target is p99 <= settle_seconds + 1 s.

2. **Sustained throughput.**  The whole corpus is dropped as fast as the dropper can
   (temporary name + rename, so no partial file is ever visible), and the rate at
   which the daemon files it is measured from its log: ``(n - 1) / (last - first)``
   between the first and the last filed record (steady state: the settle wait before
   the first file is excluded), plus the end-to-end rate from the first drop.  It is
   compared with ``dicomwatch sort`` on the same corpus, measured the same way
   (steady state, from its JSON log): target >= 90 %.

3. **100,000-file backlog.**  100,000 small uncompressed DICOM files (16x16 pixels,
   about 1.3 KB each; generated once from one template by patching fixed-width UIDs
   and numbers, cached in ``bench/out/backlog-100000/``) are hard-linked into the
   inbox *before* the daemon starts.  Measured: process start to the first filed
   record (target <= 5 s), the peak resident memory of the whole process tree while
   the backlog waits and drains (target < 300 MB), and the drain rate.  The daemon is
   stopped after ``--backlog-seconds`` of draining (or when drained) with SIGTERM;
   what was filed by then is reported.

Memory: a thread samples the daemon's process tree (main process, fork server,
resource tracker, workers) with psutil every 0.1 s: summed RSS (pages shared between
forked processes are counted once per process, so this over-states real use) and,
every 0.5 s, summed PSS (shared pages split between the processes that map them;
the honest "what does this cost the machine" figure).

Run alone: ``python bench/daemon_bench.py --size quick`` (uses the cached corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

if __package__ in (None, ""):  # run as `python bench/daemon_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out"

SETTLE_SECONDS = 2.0
MODES = ("copy", "slow", "rename")
SLOW_CHUNKS = 4
SLOW_SPREAD_S = 0.5
BACKLOG_FILES = 100_000
BACKLOG_VERSION = 1
_FILE_MARK = b'"event": "file"'


def dicomwatch_src() -> Path:
    """The source tree whose ``dicomwatch`` package the benchmark runs.

    This checkout, unless ``BENCH_DICOMWATCH_SRC`` names another one (a folder holding
    a ``dicomwatch/`` package): for before/after comparisons of a change on the same
    corpus, with the same harness.  Children run with it as their working directory,
    because ``python -m`` puts the working directory first on the import path.
    """
    return Path(os.environ.get("BENCH_DICOMWATCH_SRC") or REPO_ROOT).resolve()


def dicomwatch_env() -> dict[str, str]:
    """Environment for a ``python -m dicomwatch`` child: the source tree first on the path."""
    env = dict(os.environ)
    src = str(dicomwatch_src())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- daemon


class TreeMemory(threading.Thread):
    """Peak summed RSS (every 0.1 s) and PSS (every 0.5 s) of a process and its descendants.

    Also keeps the latest CPU time (user + system) of every process seen, so CPU
    seconds per filed file can be computed between two :meth:`cpu` snapshots: on a
    shared machine that figure moves far less than any rate does.
    """

    def __init__(self, pid: int, interval: float = 0.1, pss_every: int = 5) -> None:
        super().__init__(daemon=True, name="bench-tree-memory")
        self.pid = pid
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.max_procs = 0
        self.samples = 0
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the whole tree, of the root process alone) as last sampled."""
        with self._lock:
            return sum(self._cpu.values()), self._cpu.get(self.pid, 0.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        tick = 0
        while not self._stop_event.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            want_pss = tick % self.pss_every == 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    with self._lock:
                        self._cpu[p.pid] = times.user + times.system
                    if want_pss:
                        full = p.memory_full_info()
                        rss += full.rss
                        pss += full.pss
                    else:
                        rss += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            if want_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, len(procs))
            self.samples += 1
            tick += 1
            self._stop_event.wait(self.interval)


@dataclass
class FileRecord:
    """One ``file`` record of the daemon's JSON log."""

    name: str
    outcome: str
    time: float


class Daemon:
    """``dicomwatch run`` in a scratch folder, with its JSON-lines log in a file."""

    def __init__(self, root: Path, **overrides: Any) -> None:
        root = root.resolve()  # the child runs in the source tree, not here
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        self.root = root
        self.inbox = root / "inbox"
        self.archive = root / "archive"
        self.log_path = root / "daemon.log"
        self.config_path = root / "config.yaml"
        config = {
            "inbox": str(self.inbox),
            "archive": str(self.archive),
            "quarantine": str(root / "quarantine"),
            "processed": str(root / "processed"),
            "settle_seconds": SETTLE_SECONDS,
            "node_id": "bench",
            "log_format": "json",
            **overrides,
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.memory: TreeMemory | None = None
        self.started_at = 0.0
        self._log_offset = 0
        self._filed = 0

    def start(self) -> float:
        """Start the process; returns ``time.time()`` taken just before it was forked."""
        env = dicomwatch_env()
        with self.log_path.open("ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomwatch", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
                cwd=dicomwatch_src(),
                start_new_session=True,
            )
        self.memory = TreeMemory(self.proc.pid)
        self.memory.start()
        return self.started_at

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (whole tree, main process); see :class:`TreeMemory`."""
        assert self.memory is not None
        time.sleep(0.15)  # let the sampler take a fresh sample
        return self.memory.cpu()

    def wait_watching(self, timeout: float = 60.0) -> None:
        """Block until the log says the observer runs (the daemon sees new files)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"with the " in self._log_bytes() and b"observer" in self._log_bytes():
                return
            self._check_alive()
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start watching within {timeout} s: {self.log_tail()}")

    def filed(self) -> int:
        """``file`` records so far (cheap: counts new log bytes, parses nothing)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        cut = data.rfind(b"\n") + 1
        self._filed += data[:cut].count(_FILE_MARK)
        self._log_offset += cut
        return self._filed

    def wait_filed(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.filed() >= n:
                return True
            self._check_alive()
            time.sleep(0.1)
        return self.filed() >= n

    def records(self) -> list[FileRecord]:
        out: list[FileRecord] = []
        for line in self._log_bytes().splitlines():
            if _FILE_MARK not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out.append(
                FileRecord(
                    name=os.path.basename(str(rec.get("source", ""))),
                    outcome=str(rec.get("outcome")),
                    time=datetime.fromisoformat(rec["time"]).timestamp(),
                )
            )
        return out

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM and wait; returns the seconds the daemon took to exit."""
        t0 = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        took = time.monotonic() - t0
        if self.memory is not None:
            self.memory.stop()
        return took

    def cleanup(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        return self._log_bytes()[-n:].decode("utf-8", "replace")

    def _log_bytes(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")


# --------------------------------------------------------------------------- droppers


@dataclass
class DropLog:
    """When the dropper finished each file (``time.time()``) and how far it fell behind."""

    done: dict[str, float] = field(default_factory=dict)
    max_lag_s: float = 0.0
    started: float = 0.0
    finished: float = 0.0


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def drop_at_rate(inbox: Path, blobs: list[bytes], mode: str, rate: float) -> DropLog:
    """Drop ``blobs`` into ``inbox`` at ``rate`` files/s in the given ``mode``.

    One thread runs a small event schedule (a heap of due actions), so the slow mode's
    ~25 files open at once need no threads.  Names are ``<mode>-<i>.dcm``.  If the
    dropper cannot keep up, actions run late and ``max_lag_s`` says by how much.
    """
    log = DropLog()
    events: list[tuple[float, int, Callable[[], None]]] = []
    seq = 0

    def at(when: float, action: Callable[[], None]) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, seq, action))

    t0 = time.monotonic() + 0.2
    log.started = time.time() + 0.2
    for i, data in enumerate(blobs):
        name = f"{mode}-{i:05d}.dcm"
        start = t0 + i / rate
        if mode == "copy":
            at(start, _copy_action(inbox / name, data, name, log))
        elif mode == "rename":
            at(start, _rename_action(inbox, name, data, log))
        elif mode == "slow":
            _slow_actions(at, start, inbox / name, data, name, log)
        else:
            raise ValueError(mode)
    while events:
        when, _, action = heapq.heappop(events)
        now = time.monotonic()
        if when > now:
            time.sleep(when - now)
        else:
            log.max_lag_s = max(log.max_lag_s, now - when)
        action()
    log.finished = time.time()
    return log


def _copy_action(path: Path, data: bytes, name: str, log: DropLog) -> Callable[[], None]:
    def act() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        log.done[name] = time.time()

    return act


def _rename_action(inbox: Path, name: str, data: bytes, log: DropLog) -> Callable[[], None]:
    def act() -> None:
        tmp = inbox / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, inbox / name)
        log.done[name] = time.time()

    return act


def _slow_actions(
    at: Callable[[float, Callable[[], None]], None],
    start: float,
    path: Path,
    data: bytes,
    name: str,
    log: DropLog,
) -> None:
    """4 chunks at start, +1/6 s, +2/6 s, +3/6 s; the file stays open in between."""
    step = -(-len(data) // SLOW_CHUNKS)
    state: dict[str, int] = {}

    def chunk(k: int) -> Callable[[], None]:
        def act() -> None:
            if k == 0:
                state["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fd = state["fd"]
            _write_all(fd, memoryview(data)[k * step : (k + 1) * step])
            if k == SLOW_CHUNKS - 1:
                os.close(fd)
                log.done[name] = time.time()

        return act

    for k in range(SLOW_CHUNKS):
        at(start + k * SLOW_SPREAD_S / (SLOW_CHUNKS - 1), chunk(k))


def drop_fast(inbox: Path, blobs: list[bytes]) -> DropLog:
    """Drop everything as fast as possible, temporary name then rename."""
    log = DropLog(started=time.time())
    for i, data in enumerate(blobs):
        name = f"bulk-{i:05d}.dcm"
        _rename_action(inbox, name, data, log)()
    log.finished = time.time()
    return log


# --------------------------------------------------------------------------- figures


def _cpu_figures(
    before: tuple[float, float], after: tuple[float, float], files: int
) -> dict[str, float]:
    """CPU milliseconds per filed file, whole tree and main process, between snapshots.

    Workers replaced in between would be missed; none are in these runs.
    """
    n = max(files, 1)
    return {
        "cpu_ms_per_file": (after[0] - before[0]) * 1000 / n,
        "main_cpu_ms_per_file": (after[1] - before[1]) * 1000 / n,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the value q % of the samples do not exceed."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def steady_rate(times: list[float]) -> float:
    """Files/s between the first and the last record: (n - 1) / (last - first)."""
    if len(times) < 2:
        return 0.0
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else 0.0


def load_corpus_blobs(files_dir: Path, limit: int | None = None) -> list[bytes]:
    names = sorted(os.listdir(files_dir))
    if limit is not None:
        names = names[:limit]
    return [(files_dir / n).read_bytes() for n in names]


def run_latency(
    work: Path, blobs: list[bytes], mode: str, rate: float, *, keep: bool = False
) -> dict[str, Any]:
    """One daemon, one drop mode at ``rate`` files/s; per-file latency figures."""
    d = Daemon(work / f"daemon-latency-{mode}")
    d.start()
    try:
        d.wait_watching()
        load1 = os.getloadavg()[0]
        cpu0 = d.cpu()
        drops = drop_at_rate(d.inbox, blobs, mode, rate)
        all_filed = d.wait_filed(len(blobs), timeout=120)
        cpu1 = d.cpu()
    finally:
        d.stop()
    records = d.records()
    latencies = [r.time - drops.done[r.name] for r in records if r.name in drops.done]
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    assert d.memory is not None
    result = {
        "mode": mode,
        "rate": rate,
        "files": len(blobs),
        "filed": len(records),
        "all_filed": all_filed,
        "outcomes": outcomes,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies) if latencies else float("nan"),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "dropper_max_lag_s": drops.max_lag_s,
        "drop_seconds": drops.finished - drops.started,
        **_cpu_figures(cpu0, cpu1, len(records)),
        "peak_rss_tree_mb": d.memory.peak_rss / 1e6,
        "peak_pss_tree_mb": d.memory.peak_pss / 1e6,
        "load1": load1,
    }
    d.cleanup(keep)
    return result


def run_throughput(work: Path, blobs: list[bytes], *, keep: bool = False) -> dict[str, Any]:
    """Drop the whole corpus at once into a running daemon; its filing rate."""
    d = Daemon(work / "daemon-throughput")
    d.start()
    try:
        d.wait_watching()
        load1 = os.getloadavg()[0]
        cpu0 = d.cpu()
        drops = drop_fast(d.inbox, blobs)
        all_filed = d.wait_filed(len(blobs), timeout=600)
        cpu1 = d.cpu()
    finally:
        d.stop()
    records = d.records()
    times = [r.time for r in records]
    assert d.memory is not None
    result = {
        "files": len(blobs),
        "filed": len(records),
        "all_filed": all_filed,
        "bytes": sum(len(b) for b in blobs),
        "drop_seconds": drops.finished - drops.started,
        "steady_files_per_s": steady_rate(times),
        "end_to_end_files_per_s": len(times) / (max(times) - drops.started) if times else 0.0,
        "first_filed_after_drop_start_s": (min(times) - drops.started) if times else None,
        **_cpu_figures(cpu0, cpu1, len(records)),
        "peak_rss_tree_mb": d.memory.peak_rss / 1e6,
        "peak_pss_tree_mb": d.memory.peak_pss / 1e6,
        "load1": load1,
    }
    d.cleanup(keep)
    return result


# --------------------------------------------------------------------------- backlog


def _backlog_template() -> tuple[bytes, dict[str, tuple[bytes, int]]]:
    """One small CT file and the fixed-width tokens to patch per copy.

    Returns the bytes and, per token, (placeholder bytes, how often it must occur).
    """
    from io import BytesIO

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    sop = "1.2.826.0.1.3680043.8.498.99.1999999999"
    series = "1.2.826.0.1.3680043.8.498.98.1999999999"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.97.1"
    ds.SeriesInstanceUID = series
    ds.PatientID = "BACKLOG"
    ds.PatientName = "Backlog^Test"
    ds.StudyDate = "20240101"
    ds.StudyDescription = "BACKLOG STUDY"
    ds.SeriesDescription = "SERIES 9999"
    ds.Modality = "CT"
    ds.InstanceNumber = "888888"
    ds.Rows = 16
    ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype="<u2") * 7).tobytes()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    tokens = {
        "sop": (sop.encode(), 2),
        "series": (series.encode(), 1),
        "desc": (b"SERIES 9999", 1),
        "number": (b"888888", 1),
    }
    return buf.getvalue(), tokens


def make_backlog(out: Path, n: int = BACKLOG_FILES) -> Path:
    """The cached backlog folder (``out/backlog-N/files``); generated once, ~10-30 s.

    Each file differs in SOP Instance UID, Instance Number and, per 1000 files, the
    series (UID and description), so the archive gets 100 folders of 1000 files.
    """
    root = out / f"backlog-{n}"
    files = root / "files"
    manifest = root / "backlog.json"
    with contextlib.suppress(OSError, ValueError):
        m = json.loads(manifest.read_text())
        if m.get("version") == BACKLOG_VERSION and m.get("files") == n:
            with os.scandir(files) as it:
                if sum(1 for _ in it) == n:
                    return files
    if root.exists():
        shutil.rmtree(root)
    files.mkdir(parents=True)
    template, tokens = _backlog_template()
    offsets: dict[str, list[int]] = {}
    for key, (token, count) in tokens.items():
        found, pos = [], template.find(token)
        while pos >= 0:
            found.append(pos)
            pos = template.find(token, pos + 1)
        if len(found) != count:
            raise RuntimeError(f"backlog template: token {key} found {len(found)} times")
        offsets[key] = found
    buf = bytearray(template)
    t0 = time.perf_counter()
    for i in range(n):
        series = i // 1000
        values = {
            "sop": f"1{i:09d}".encode(),
            "series": f"1{series:09d}".encode(),
            "desc": f"{series:04d}".encode(),
            "number": f"{i + 1:06d}".encode(),
        }
        for key, value in values.items():
            token = tokens[key][0]
            for pos in offsets[key]:
                end = pos + len(token)
                buf[end - len(value) : end] = value
        fd = os.open(files / f"b{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, buf)
        finally:
            os.close(fd)
    manifest.write_text(
        json.dumps(
            {
                "version": BACKLOG_VERSION,
                "files": n,
                "bytes_per_file": len(template),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return files


def run_backlog(
    work: Path, backlog: Path, n: int, *, drain_seconds: float, keep: bool = False
) -> dict[str, Any]:
    """Hard-link the backlog into an inbox, start the daemon, measure, stop."""
    d = Daemon(work / "daemon-backlog")
    t0 = time.perf_counter()
    subprocess.run(["cp", "-al", str(backlog), str(d.inbox)], check=True)
    link_seconds = time.perf_counter() - t0
    os.sync()
    load1 = os.getloadavg()[0]
    started = d.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and d.filed() == 0:
            d._check_alive()
            time.sleep(0.02)
        cpu0, filed0 = d.cpu(), d.filed()
        cpu1, filed1 = cpu0, filed0
        if filed0:
            d.wait_filed(n, timeout=drain_seconds)
            cpu1, filed1 = d.cpu(), d.filed()
    finally:
        stop_seconds = d.stop()
    records = d.records()
    times = [r.time for r in records]
    assert d.memory is not None
    result = {
        "files": n,
        "filed": len(records),
        "drained": len(records) >= n,
        "link_seconds": link_seconds,
        "first_filed_after_start_s": (min(times) - started) if times else None,
        "drain_window_s": (max(times) - min(times)) if times else 0.0,
        "drain_files_per_s": steady_rate(times),
        **_cpu_figures(cpu0, cpu1, filed1 - filed0),
        "peak_rss_tree_mb": d.memory.peak_rss / 1e6,
        "peak_pss_tree_mb": d.memory.peak_pss / 1e6,
        "max_procs": d.memory.max_procs,
        "stop_seconds": stop_seconds,
        "drain_limit_s": drain_seconds,
        "load1": load1,
    }
    d.cleanup(keep)
    return result


# --------------------------------------------------------------------------- report


@dataclass
class DaemonBenchResult:
    latency: list[dict[str, Any]]
    throughput: dict[str, Any] | None
    backlog: dict[str, Any] | None
    sort_steady_files_per_s: float | None = None
    sort_wall_files_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines: list[str] = []
        if self.latency:
            lines += [
                f"Latency: last write (or rename) -> archived, settle_seconds {SETTLE_SECONDS:g}",
                "",
                "| drop mode | rate files/s | files | filed | p50 s | p95 s | p99 s | max s "
                "| dropper lag s | CPU ms/file (tree / main) | peak RSS MB (tree) "
                "| peak PSS MB (tree) | load (1 min) |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for r in self.latency:
                lines.append(
                    f"| {r['mode']} | {r['rate']:g} | {r['files']} | {r['filed']} "
                    f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | {r['max_s']:.2f} "
                    f"| {r['dropper_max_lag_s']:.3f} "
                    f"| {r['cpu_ms_per_file']:.1f} / {r['main_cpu_ms_per_file']:.1f} "
                    f"| {r['peak_rss_tree_mb']:.0f} "
                    f"| {r['peak_pss_tree_mb']:.0f} | {r['load1']:.2f} |"
                )
            lines.append("")
        if self.throughput:
            t = self.throughput
            lines += [
                "Sustained throughput (whole corpus dropped at once, temp + rename):",
                "",
                "| | files | files/s | vs sort (steady) | CPU ms/file (tree / main) "
                "| peak RSS MB (tree) | peak PSS MB (tree) | load (1 min) |",
                "|---|--:|--:|--:|--:|--:|--:|--:|",
            ]
            ratio = self.throughput_ratio()
            lines.append(
                f"| daemon, steady (first -> last filed) | {t['filed']} "
                f"| {t['steady_files_per_s']:.1f} "
                f"| {'-' if ratio is None else f'{ratio:.0%}'} "
                f"| {t['cpu_ms_per_file']:.1f} / {t['main_cpu_ms_per_file']:.1f} "
                f"| {t['peak_rss_tree_mb']:.0f} "
                f"| {t['peak_pss_tree_mb']:.0f} | {t['load1']:.2f} |"
            )
            lines.append(
                f"| daemon, end to end (first drop -> last filed) | {t['filed']} "
                f"| {t['end_to_end_files_per_s']:.1f} | | | | | |"
            )
            if self.sort_steady_files_per_s:
                lines.append(
                    f"| dicomwatch sort (default workers), steady | {t['files']} "
                    f"| {self.sort_steady_files_per_s:.1f} | 100% | | | | |"
                )
            if self.sort_wall_files_per_s:
                lines.append(
                    f"| dicomwatch sort (default workers), wall clock | {t['files']} "
                    f"| {self.sort_wall_files_per_s:.1f} | | | | | |"
                )
            lines.append("")
        if self.backlog:
            b = self.backlog
            first = b["first_filed_after_start_s"]
            lines += [
                f"Backlog: {b['files']:,} small files in the inbox before start "
                f"(stopped after {b['drain_limit_s']:g} s of draining or when drained):",
                "",
                "| first filed after start s | filed | drain files/s "
                "| CPU ms/file (tree / main) | peak RSS MB (tree) "
                "| peak PSS MB (tree) | processes | SIGTERM -> exit s | load (1 min) |",
                "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
                f"| {'-' if first is None else f'{first:.2f}'} | {b['filed']:,} "
                f"| {b['drain_files_per_s']:.0f} "
                f"| {b['cpu_ms_per_file']:.2f} / {b['main_cpu_ms_per_file']:.2f} "
                f"| {b['peak_rss_tree_mb']:.0f} "
                f"| {b['peak_pss_tree_mb']:.0f} | {b['max_procs']} | {b['stop_seconds']:.1f} "
                f"| {b['load1']:.2f} |",
                "",
            ]
        return "\n".join(lines)

    def throughput_ratio(self) -> float | None:
        if not self.throughput or not self.sort_steady_files_per_s:
            return None
        return float(self.throughput["steady_files_per_s"]) / self.sort_steady_files_per_s


def run_daemon_bench(
    files_dir: Path,
    work: Path,
    out: Path,
    *,
    rate: float = 50.0,
    latency_files: int = 600,
    modes: tuple[str, ...] = MODES,
    throughput: bool = True,
    backlog_files: int = BACKLOG_FILES,
    backlog_seconds: float = 60.0,
    keep: bool = False,
    progress: Callable[[str], None] = print,
) -> DaemonBenchResult:
    """All daemon measurements; ``backlog_files=0`` skips the backlog."""
    work.mkdir(parents=True, exist_ok=True)
    latency: list[dict[str, Any]] = []
    if modes:
        blobs = load_corpus_blobs(files_dir, latency_files)
        for mode in modes:
            progress(f"daemon latency: {mode}, {len(blobs)} files at {rate:g}/s")
            latency.append(run_latency(work, blobs, mode, rate, keep=keep))
    tp = None
    if throughput:
        blobs = load_corpus_blobs(files_dir)
        progress(f"daemon throughput: {len(blobs)} files at once")
        tp = run_throughput(work, blobs, keep=keep)
        del blobs
    bl = None
    if backlog_files:
        t0 = time.perf_counter()
        backlog = make_backlog(out, backlog_files)
        progress(f"backlog of {backlog_files:,} files ready in {time.perf_counter() - t0:.1f} s")
        bl = run_backlog(work, backlog, backlog_files, drain_seconds=backlog_seconds, keep=keep)
    return DaemonBenchResult(latency=latency, throughput=tp, backlog=bl)


def main(argv: list[str] | None = None) -> int:
    """CLI: the daemon measurements alone, on a cached corpus."""
    from bench.corpus import SIZES, make_corpus

    ap = argparse.ArgumentParser(description="dicomwatch run: latency, throughput, backlog")
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--latency-files", type=int, default=600)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--backlog-files", type=int, default=BACKLOG_FILES, help="0: skip")
    ap.add_argument("--backlog-seconds", type=float, default=60.0)
    ap.add_argument("--keep-output", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    corpus = make_corpus(out / f"corpus-{args.size}-seed{args.seed}", SIZES[args.size], args.seed)
    result = run_daemon_bench(
        corpus.files_dir,
        out / "work",
        out,
        rate=args.rate,
        latency_files=args.latency_files,
        modes=tuple(m for m in args.modes.split(",") if m),
        throughput=not args.no_throughput,
        backlog_files=args.backlog_files,
        backlog_seconds=args.backlog_seconds,
        keep=args.keep_output,
    )
    print(result.markdown())
    (out / f"daemon-{args.size}.json").write_text(json.dumps(result.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
