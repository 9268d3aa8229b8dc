"""``dicomwatch sort``: file an existing folder tree once, across all cores.

The walk is a generator and at most ``workers`` tasks are in flight, so memory does not
grow with the number of files; the engine is the same one the daemon uses.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from dicomwatch.config import INTERNAL_DIR, Config
from dicomwatch.decode import log_codecs
from dicomwatch.indexsink import index_sinks
from dicomwatch.pool import WorkerPool
from dicomwatch.result import Outcome, Result
from dicomwatch.sinks import Counters, LogSink, Sinks
from dicomwatch.sorter import Task
from dicomwatch.staging import Staging, owner_name

log = logging.getLogger(__name__)


def walk_files(sources: Sequence[Path], skip: Sequence[Path]) -> Iterator[Path]:
    """Every regular file below ``sources``, lazily; never follows links or enters ``skip``."""
    skip_real = {os.path.realpath(p) for p in skip}
    for source in sources:
        st = os.lstat(source)
        if stat.S_ISREG(st.st_mode):
            yield source
            continue
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d != INTERNAL_DIR and os.path.realpath(os.path.join(dirpath, d)) not in skip_real
            )
            for name in sorted(filenames):
                path = Path(dirpath, name)
                try:
                    mode = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(mode):
                    yield path
                else:
                    log.warning("skipped %s: not a regular file", path)


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
        pass


def run_sort(
    cfg: Config,
    sources: Sequence[Path],
    *,
    move: bool = False,
    dry_run: bool = False,
    progress: bool = False,
) -> int:
    """Sort ``sources`` into ``cfg.archive``; exit status 0 if all filed, else 1."""
    workers = cfg.effective_workers
    counters = Counters()
    staging = Staging(cfg, owner_name(cfg, "sort"))
    settings = (
        staging.open() if not dry_run else staging.settings_for(cfg, [cfg.archive, cfg.quarantine])
    )
    pool = WorkerPool(workers, memory_mb=cfg.worker_memory_mb)
    bar = _progress(progress)
    sinks = Sinks(
        [
            PlanSink() if dry_run else LogSink(),
            counters,
            *([_ProgressSink(bar)] if bar is not None else []),
            *index_sinks(cfg, owner_name(cfg, "sort"), enabled=not dry_run),
        ]
    )
    log.info(
        "sorting %s into %s with %d workers%s",
        ", ".join(map(str, sources)),
        cfg.archive,
        workers,
        " (dry run)" if dry_run else "",
    )
    log_codecs(cfg.decompress)
    try:
        pool.start()
        files = walk_files(sources, [cfg.archive, cfg.quarantine])
        exhausted = False
        while True:
            while not exhausted and pool.idle:
                path = next(files, None)
                if path is None:
                    exhausted = True
                    break
                task = Task(
                    path=str(path),
                    source=str(path),
                    remove_source=move and not dry_run,
                    rel_source=path.name,
                    dry_run=dry_run,
                )
                pool.submit(task, settings)
            if exhausted and not pool.busy:
                break
            for done in pool.poll(timeout=1.0):
                sinks.on_result(done.task, done.result)
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown()
        if not dry_run:
            staging.close()
    sinks.flush()
    log.info("%s", counters.sort_summary())
    return 0 if counters.bad == 0 else 1
