"""``dicomwatch sort``: file an existing folder tree once, across all cores.

The walk is a generator and at most ``workers`` tasks are in flight, so memory does not
grow with the number of files; the engine is the same one the daemon uses.

With ``--move`` a source is removed once filed, so a file still being written must not be
filed: the daemon's settle rule applies.  A file modified within the last
``settle_seconds`` is set aside and filed only once its ``(size, mtime_ns)`` has held
still for ``settle_seconds`` (:class:`dicomwatch.settle.SettleTracker`).  After the walk,
sort waits for the files set aside, at most ``settle_seconds + SETTLE_PATIENCE_SECONDS``;
those still changing then are reported as failed (``still_changing``) and left alone.
At most ``MAX_DEFERRED`` files are set aside at once; the walk waits when that many are.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from dicomwatch.config import Config
from dicomwatch.decode import log_codecs
from dicomwatch.indexsink import index_sinks
from dicomwatch.pool import WorkerPool
from dicomwatch.reasons import Reason
from dicomwatch.result import Outcome, Result
from dicomwatch.settle import SettleTracker
from dicomwatch.sinks import Counters, LogSink, ResultSink, Sinks
from dicomwatch.sorter import EngineSettings, Task
from dicomwatch.sources import overlapping_source, walk_files
from dicomwatch.staging import Staging, owner_name

log = logging.getLogger(__name__)

SETTLE_PATIENCE_SECONDS = 60.0
"""How long, beyond ``settle_seconds``, ``sort --move`` waits after its walk for files
that were still changing."""
MAX_DEFERRED = 10_000
"""Files ``sort --move`` sets aside at once while they are still changing."""
POLL_SECONDS = 1.0


class _Bar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def close(self) -> None: ...


def _progress(enabled: bool) -> _Bar | None:
    """A tqdm bar on stderr (the log stream), shown only when asked or on a terminal."""
    if not enabled:
        return None
    from tqdm import tqdm

    bar: _Bar = tqdm(unit="file", dynamic_ncols=True, file=sys.stderr, leave=False)
    return bar


class PlanSink:
    """``--dry-run``: where each file would go; destinations are kept to report collisions."""

    def __init__(self) -> None:
        self.planned: dict[str, list[str]] = {}

    def on_result(self, task: Task, result: Result) -> None:
        if result.outcome is Outcome.SORTED and result.destination:
            note = " (exists)" if os.path.lexists(result.destination) else ""
            print(f"would file {result.source} -> {result.destination}{note}")
            self.planned.setdefault(result.destination, []).append(result.source)
        elif result.outcome is Outcome.QUARANTINED:
            print(f"would quarantine {result.source}: {result.reason}: {result.message}")
        else:
            print(f"cannot read {result.source}: {result.message}")

    def flush(self) -> None:
        for dest, srcs in self.planned.items():
            if len(srcs) > 1:
                print(f"collision {dest}: " + ", ".join(srcs))


class _ProgressSink:
    """Advances the progress bar by one per result."""

    def __init__(self, bar: _Bar) -> None:
        self.bar = bar

    def on_result(self, task: Task, result: Result) -> None:
        self.bar.update(1)

    def flush(self) -> None:
        self.bar.close()


def run_sort(
    cfg: Config,
    sources: Sequence[Path],
    *,
    move: bool = False,
    dry_run: bool = False,
    progress: bool = False,
) -> int:
    """Sort ``sources`` into ``cfg.archive``; exit status 0 if all filed, else 1.

    2 (a usage error, nothing done) if a source is, contains or lies inside the archive
    or the quarantine (see :func:`dicomwatch.sources.overlapping_source`).
    """
    overlap = overlapping_source(sources, [cfg.archive, cfg.quarantine])
    if overlap is not None:
        print(f"dicomwatch sort: {overlap}", file=sys.stderr)
        return 2
    counters = Counters()
    bar = _progress(progress)
    sinks: list[ResultSink] = [PlanSink() if dry_run else LogSink(), counters]
    if bar is not None:
        sinks.append(_ProgressSink(bar))
    sinks.extend(index_sinks(cfg, owner_name(cfg, "sort"), enabled=not dry_run))
    SortRun(cfg, sources, move=move, dry_run=dry_run, sinks=Sinks(sinks)).run()
    log.info("%s", counters.sort_summary())
    return 0 if counters.bad == 0 else 1


class SortRun:
    """One ``sort``: walk, feed idle workers, collect results into the sinks."""

    def __init__(
        self,
        cfg: Config,
        sources: Sequence[Path],
        *,
        move: bool,
        dry_run: bool,
        sinks: Sinks,
    ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.dry_run = dry_run
        self.remove = move and not dry_run
        self.sinks = sinks
        self.staging = Staging(cfg, owner_name(cfg, "sort"))
        self.pool = WorkerPool(cfg.effective_workers, memory_mb=cfg.worker_memory_mb)
        self.settling = _Settling(cfg.settle_seconds) if self.remove else None
        self.files: Iterator[Path] = iter(())
        self.exhausted = False
        self._settings: EngineSettings | None = None

    def run(self) -> None:
        self.start()
        try:
            while not self.done():
                self.step()
        finally:
            self.stop()

    def start(self) -> None:
        cfg = self.cfg
        roots = [cfg.archive, cfg.quarantine]
        self._settings = (
            self.staging.settings_for(cfg, roots) if self.dry_run else self.staging.open()
        )
        log.info(
            "sorting %s into %s with %d workers%s",
            ", ".join(map(str, self.sources)),
            cfg.archive,
            self.pool.size,
            " (dry run)" if self.dry_run else "",
        )
        log_codecs(cfg.decompress)
        self.pool.start()
        self.files = walk_files(self.sources, roots)

    def step(self) -> None:
        """One turn: settled files first, then the walk, then wait for results."""
        self.submit_settled()
        self.feed_from_walk()
        self.give_up_on_changing()
        self.collect()

    def done(self) -> bool:
        waiting = self.settling is not None and self.settling.pending
        return self.exhausted and not self.pool.busy and not waiting

    def stop(self) -> None:
        self.pool.shutdown()
        if not self.dry_run:
            self.staging.close()
        self.sinks.flush()

    def submit_settled(self) -> None:
        if self.settling is not None:
            for path in self.settling.ready(self.pool.idle):
                self.submit(path)

    def feed_from_walk(self) -> None:
        while not self.exhausted and self.pool.idle and self._has_room():
            path = next(self.files, None)
            if path is None:
                self.exhausted = True
                if self.settling is not None:
                    self.settling.walk_done()
                return
            if self.settling is None or self.settling.take(path):
                self.submit(path)

    def give_up_on_changing(self) -> None:
        if self.settling is not None and self.exhausted:
            for result in self.settling.give_up():
                self.sinks.on_result(Task(path=result.source, source=result.source), result)

    def collect(self) -> None:
        timeout = POLL_SECONDS if self.settling is None else self.settling.wait(POLL_SECONDS)
        for done in self.pool.poll(timeout=timeout):
            self.sinks.on_result(done.task, done.result)

    def submit(self, path: Path) -> None:
        assert self._settings is not None
        task = Task(
            path=str(path),
            source=str(path),
            remove_source=self.remove,
            rel_source=path.name,
            dry_run=self.dry_run,
        )
        self.pool.submit(task, self._settings)

    def _has_room(self) -> bool:
        return self.settling is None or self.settling.has_room


class _Settling:
    """``sort --move``'s settle rule: which files may be filed now, which must wait."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_ns = int(settle_seconds * 1e9)
        self.tracker = SettleTracker(settle_seconds) if settle_seconds > 0 else None
        self.deadline: float | None = None
        self.patience = settle_seconds + SETTLE_PATIENCE_SECONDS

    def take(self, path: Path) -> bool:
        """True if ``path`` may be filed now: not modified within ``settle_seconds``.
        Otherwise it is set aside (a vanished file is simply forgotten)."""
        if self.tracker is None:
            return True
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        age = time.time_ns() - st.st_mtime_ns
        if 0 <= self.settle_ns <= age:
            return True
        self.tracker.touch(str(path), changed=False)
        return False

    @property
    def has_room(self) -> bool:
        return self.tracker is None or len(self.tracker) < MAX_DEFERRED

    @property
    def pending(self) -> int:
        return 0 if self.tracker is None else len(self.tracker)

    def ready(self, limit: int) -> list[Path]:
        """Files set aside whose signature has now held still for ``settle_seconds``."""
        if self.tracker is None or limit <= 0:
            return []
        out = [Path(p) for p in self.tracker.ready(limit)]
        for path, kind in self.tracker.drain_special():
            log.warning("skipped %s: not a regular file (%s)", path, kind)
        return out

    def walk_done(self) -> None:
        self.deadline = time.monotonic() + self.patience

    def give_up(self) -> list[Result]:
        """Once the wait after the walk is over: every file still changing, as failed."""
        if self.tracker is None or self.deadline is None or time.monotonic() < self.deadline:
            return []
        results = []
        for path in list(self.tracker):
            self.tracker.forget(path)
            results.append(
                Result(
                    outcome=Outcome.FAILED,
                    source=path,
                    reason=Reason.STILL_CHANGING,
                    message=f"still being written {self.patience:.0f} s after the walk; "
                    "not filed, left in place",
                    retryable=True,
                )
            )
        return results

    def wait(self, longest: float) -> float:
        """How long the caller may block: until the next file is due, at most ``longest``."""
        if self.tracker is None or not len(self.tracker):
            return longest
        due = self.tracker.next_due()
        now = time.monotonic()
        bounds = [longest]
        if due is not None:
            bounds.append(due - now)
        if self.deadline is not None:
            bounds.append(self.deadline - now)
        return max(0.0, min(bounds))
