"""``dicomwatch sort``: file an existing folder tree once, across all cores.

The walk is a generator and at most ``workers`` tasks are in flight, so memory does not
grow with the number of files; the engine is the same one the daemon uses.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dicomwatch.archive import INTERNAL_DIR
from dicomwatch.config import Config
from dicomwatch.engine import Engine, log_codecs, owner_name
from dicomwatch.events import Outcome, Result
from dicomwatch.logconfig import log_result
from dicomwatch.pool import WorkerPool
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """Counts per outcome, and the rate, for the summary line and the exit status."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: Result) -> None:
        self.counts[result.outcome] += 1
        self.bytes += result.bytes

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        c = self.counts
        return (
            f"sorted {c[Outcome.SORTED]}, duplicates {c[Outcome.DUPLICATE]}, "
            f"conflicts {c[Outcome.CONFLICT]}, quarantined {c[Outcome.QUARANTINED]}, "
            f"errors {c[Outcome.FAILED]}; {self.total} files in {elapsed:.1f} s, "
            f"{self.total / elapsed:.1f} files/s, {self.bytes / elapsed / 1e6:.1f} MB/s"
        )


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
    tally = Tally()
    engine = Engine(cfg, owner_name(cfg, "sort"))
    settings = (
        engine.open() if not dry_run else engine.settings_for(cfg, [cfg.archive, cfg.quarantine])
    )
    planned: dict[str, list[str]] = {}
    pool = WorkerPool(workers, memory_mb=cfg.worker_memory_mb)
    bar = _progress(progress)
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
                result = done.result
                tally.add(result)
                if dry_run:
                    _print_plan(result, planned)
                else:
                    log_result(result)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown()
        if not dry_run:
            engine.close()
    if dry_run:
        for dest, srcs in planned.items():
            if len(srcs) > 1:
                print(f"collision {dest}: " + ", ".join(srcs))
    log.info("%s", tally.summary())
    bad = tally.counts[Outcome.QUARANTINED] + tally.counts[Outcome.FAILED]
    return 0 if bad == 0 else 1


def _print_plan(result: Result, planned: dict[str, list[str]]) -> None:
    """Dry run: where each file would go; remember destinations to report collisions."""
    if result.outcome is Outcome.SORTED and result.destination:
        note = " (exists)" if os.path.lexists(result.destination) else ""
        print(f"would file {result.source} -> {result.destination}{note}")
        planned.setdefault(result.destination, []).append(result.source)
    elif result.outcome is Outcome.QUARANTINED:
        print(f"would quarantine {result.source}: {result.reason}: {result.message}")
    else:
        print(f"cannot read {result.source}: {result.message}")
