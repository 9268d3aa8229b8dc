"""Time one command as a subprocess and record its throughput and memory.

Every benchmark row (the floors and, later, ``dicomwatch sort``) goes through
:func:`measure`, so all rows are measured the same way:

* **Wall time**: ``time.perf_counter()`` from just before the command is forked to the
  moment it is reaped (taken inside the launcher described below). Interpreter start-up
  and imports of a Python command are included on purpose -- a user running a sort pays
  for them too -- and weigh most on the small ``quick`` corpus.
* **Peak RSS of the tree** (``peak_rss_tree_mb``): psutil polls the command and all its
  descendants every 50 ms and sums their RSS; the highest sum is kept. This is what a
  multi-process sorter costs the machine. Caveats: spikes shorter than the poll interval
  can be missed, and pages shared between forked workers are counted once per process
  (an over-estimate, on the safe side). It is never reported below ``max_rss_mb``
  (which matters for commands that finish before the first sample, like ``cp``).
* **Max RSS of one process** (``max_rss_mb``): the kernel's exact ``ru_maxrss``: the
  largest single process among the command and all its descendants. It never misses a
  spike but does not add up workers. How it is obtained, and why:

  - The command is started by a tiny launcher (``python -S``, about 9 MB) that reports
    its own ``getrusage(RUSAGE_CHILDREN)`` after reaping everything. A fresh launcher
    per run keeps runs independent: in a long-lived process RUSAGE_CHILDREN is a
    running maximum over every child ever reaped, so a later, smaller run would report
    an earlier run's peak.
  - The launcher is a child subreaper, so descendants that outlive the command (a
    multiprocessing forkserver and its workers, say) are re-parented to it and reaped,
    and their rusage is not lost to init. It waits up to 30 s for such orphans
    (``extra["orphans_reaped"]``, ``extra["orphans_left"]``); wall time still ends
    when the command itself exits.
  - On Linux, exec records the *parent's* peak RSS as the child's starting ``maxrss``,
    so commands spawned straight from this (numpy/pydicom-laden) process would all
    report at least its size; the launcher is small, so the lowest value this column
    can show is about 7-9 MB (``cp`` shows ~7 MB although it uses ~2 MB).

  The launcher also times the command itself (fork to reap), so its own start-up is
  not charged to the command, and it is excluded from the RSS tree sum.
* **CPU time** (user + system) of the command and all its descendants, from the same
  rusage: CPU seconds / wall seconds says how many cores were busy.

MB and MB/s are decimal (10**6 bytes), computed from the *input* corpus bytes, so rows
that write more (e.g. decompressed output) are still compared on the same work unit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

POLL_INTERVAL_S = 0.05


class MeasurementError(RuntimeError):
    """The measured command failed or timed out; the message carries its stderr tail."""


@dataclass
class Measurement:
    """One timed run of one command."""

    label: str
    cmd: list[str]
    files: int
    bytes: int
    seconds: float
    returncode: int
    peak_rss_tree_mb: float
    max_rss_mb: float
    cpu_user_s: float
    cpu_sys_s: float
    max_procs: int
    stdout_tail: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(files_per_s=self.files_per_s, mb_per_s=self.mb_per_s, cpu_s=self.cpu_s)
        return d


# Runs the command as its child and reports, to a file, the command's exit code and wall
# time plus the launcher's RUSAGE_CHILDREN once every descendant is reaped:
# "<returncode> <maxrss KiB> <utime> <stime> <seconds> <orphans reaped> <orphans left>".
# PR_SET_CHILD_SUBREAPER (36) makes descendants orphaned by the command -- e.g. a
# multiprocessing forkserver and its workers outliving the main process -- re-parent to
# the launcher, so their CPU time and peak RSS are counted too.
_LAUNCHER = """
import ctypes, os, resource, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
except (AttributeError, OSError):
    pass
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status = os.waitpid(pid, 0)
seconds = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
reaped, left, deadline = 0, 0, time.monotonic() + 30
while True:
    try:
        p, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if p:
        reaped += 1
    elif time.monotonic() > deadline:
        left = 1
        break
    else:
        time.sleep(0.01)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as fh:
    fh.write(f"{rc} {ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime} {seconds} {reaped} {left}")
sys.exit(rc if rc >= 0 else 128 - rc)
"""


class _TreePoller(threading.Thread):
    """Samples the summed RSS of the launcher's descendants; kills the tree past a deadline.

    The launcher itself (the root) is left out of the sum: it is not part of the
    measured command.
    """

    def __init__(self, pid: int, deadline: float | None) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.deadline = deadline
        self.peak_rss = 0
        self.max_procs = 0
        self.timed_out = False
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            total, procs = 0, 0
            try:
                tree = root.children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                try:
                    total += p.memory_info().rss
                    procs += 1
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    pass
            self.peak_rss = max(self.peak_rss, total)
            self.max_procs = max(self.max_procs, procs)
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                return
            self._stop_event.wait(POLL_INTERVAL_S)


def _tail(path: Path, limit: int = 4000) -> str:
    data = path.read_bytes()
    return data[-limit:].decode("utf-8", "replace")


def measure(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    label: str,
    files: int,
    bytes_: int,
    timeout: float | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    keep_stderr: Path | None = None,
) -> Measurement:
    """Run *cmd* to completion and measure it; see the module docstring for definitions.

    *files* and *bytes_* are the work done (the corpus size), used for files/s and MB/s.
    The child gets its own session so a timeout kills the whole tree, workers included.
    With *check* (default) a non-zero exit raises :class:`MeasurementError`, because a
    failed run is fast and would otherwise look like a great result.
    *keep_stderr*, if given, receives the command's whole stderr (e.g. a JSON-lines log
    to compute a steady-state rate from), not just the tail kept in the result.
    The 1-minute load average just before the run is kept in ``extra["load1"]``: the
    machine is shared, and a figure taken under load must say so.
    """
    argv = [os.fspath(c) for c in cmd]
    load1 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as td:
        out_path, err_path = Path(td) / "stdout", Path(td) / "stderr"
        usage_path = Path(td) / "rusage"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _LAUNCHER, str(usage_path), *argv],
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
            poller = _TreePoller(
                proc.pid, None if timeout is None else time.perf_counter() + timeout
            )
            poller.start()
            launcher_rc = proc.wait()
            poller.stop()
            poller.join()
        try:
            fields = usage_path.read_text().split()
            rc_s, maxrss_s, utime_s, stime_s, seconds_s, reaped_s, left_s = fields
        except (OSError, ValueError):  # killed before it could report
            rc_s, maxrss_s, utime_s, stime_s = str(launcher_rc), "0", "0", "0"
            seconds_s, reaped_s, left_s = "nan", "0", "0"
        m = Measurement(
            label=label,
            cmd=argv,
            files=files,
            bytes=bytes_,
            seconds=float(seconds_s),
            returncode=int(rc_s),
            # A command shorter than one poll interval leaves no sample; the tree's peak
            # is at least its largest process's, so fall back to that.
            peak_rss_tree_mb=max(poller.peak_rss, int(maxrss_s) * 1024) / 1e6,
            max_rss_mb=int(maxrss_s) * 1024 / 1e6,  # Linux reports KiB
            cpu_user_s=float(utime_s),
            cpu_sys_s=float(stime_s),
            max_procs=poller.max_procs,
            stdout_tail=_tail(out_path),
            stderr_tail=_tail(err_path),
            extra={
                "orphans_reaped": int(reaped_s),
                "orphans_left": int(left_s),
                "load1": load1,
            },
        )
        if keep_stderr is not None:
            keep_stderr.parent.mkdir(parents=True, exist_ok=True)
            keep_stderr.write_bytes(err_path.read_bytes())
    if check and (m.returncode != 0 or poller.timed_out):
        why = f"timed out after {timeout} s" if poller.timed_out else f"exit {m.returncode}"
        raise MeasurementError(f"{label}: {' '.join(argv)} -> {why}\n{m.stderr_tail}")
    return m


def markdown_table(rows: Sequence[Measurement]) -> str:
    """The benchmark table: one line per measurement, rates over the input corpus."""
    lines = [
        "| label | files | files/s | MB/s | peak RSS MB (tree) | max RSS MB (1 proc) "
        "| CPU s | seconds | load (1 min) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in rows:
        load = m.extra.get("load1")
        lines.append(
            f"| {m.label} | {m.files} | {m.files_per_s:,.1f} | {m.mb_per_s:,.1f} "
            f"| {m.peak_rss_tree_mb:,.0f} | {m.max_rss_mb:,.0f} | {m.cpu_s:,.2f} "
            f"| {m.seconds:,.2f} | {'-' if load is None else f'{load:.2f}'} |"
        )
    return "\n".join(lines)
