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
from dicomwatch.settle import SettleTracker
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)

SETTLE_PATIENCE_SECONDS = 60.0
"""How long, beyond ``settle_seconds``, ``sort --move`` waits after its walk for files
that were still changing."""
MAX_DEFERRED = 10_000
"""Files ``sort --move`` sets aside at once while they are still changing."""


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


FolderId = tuple[int, int]
"""``(st_dev, st_ino)`` of a folder: the same for every path that reaches it, whether
through a symlink or a bind mount."""


def _folder_id(path: str) -> FolderId | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _ids_upwards(path: Path) -> list[FolderId]:
    """The folder ``path`` (a file's folder, or the nearest folder that exists) and each
    of its ancestors, as ``(st_dev, st_ino)``, following ``..`` as the kernel does."""
    probe = os.path.abspath(path)
    while True:
        try:
            st = os.stat(probe)
        except OSError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return []
            probe = parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            probe = os.path.dirname(probe)
        break
    ids: list[FolderId] = []
    while len(ids) < 4096:
        try:
            st = os.stat(probe)
        except OSError:
            break
        ident = (st.st_dev, st.st_ino)
        if ids and ident == ids[-1]:
            break  # "/" is its own parent
        ids.append(ident)
        probe = os.path.join(probe, "..")
    return ids


def overlapping_source(sources: Sequence[Path], outputs: Sequence[Path]) -> str | None:
    """Why one of ``sources`` may not be sorted into ``outputs``, or None if all may.

    A source may not be an output folder, lie inside one or contain one.  Folders are
    compared by device and inode, not by path, so the archive reached through a symlink
    or a bind mount is recognised: ``sort --move`` of it would find every file to be its
    own duplicate and delete it.  An output that does not exist yet is checked through
    its nearest existing ancestor (a source may not contain that place either).
    """
    for source in sources:
        up_source = _ids_upwards(source)
        if not up_source:
            continue
        source_is_dir = os.path.isdir(source)
        for out in outputs:
            out_exists = os.path.isdir(out)
            up_out = _ids_upwards(out)
            if not up_out:
                continue
            if out_exists and up_out[0] in up_source:
                if source_is_dir and up_source[0] == up_out[0]:
                    return f"{source} is {out} (the same folder under another path)"
                return f"{source} is inside {out}"
            if source_is_dir and up_source[0] in up_out:
                return f"{source} contains {out}"
    return None


def walk_files(sources: Sequence[Path], skip: Sequence[Path]) -> Iterator[Path]:
    """Every regular file below ``sources``, lazily; never follows links or enters ``skip``
    (recognised by path and by device and inode, so also through a bind mount)."""
    skip_real = {os.path.realpath(p) for p in skip}
    skip_ids = {ident for ident in (_folder_id(os.fspath(p)) for p in skip) if ident}
    for source in sources:
        st = os.lstat(source)
        if stat.S_ISREG(st.st_mode):
            yield source
            continue
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d != INTERNAL_DIR
                and os.path.realpath(os.path.join(dirpath, d)) not in skip_real
                and _folder_id(os.path.join(dirpath, d)) not in skip_ids
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
    """Sort ``sources`` into ``cfg.archive``; exit status 0 if all filed, else 1.

    2 (a usage error, nothing done) if a source is, contains or lies inside the archive
    or the quarantine (see :func:`overlapping_source`).
    """
    overlap = overlapping_source(sources, [cfg.archive, cfg.quarantine])
    if overlap is not None:
        print(f"dicomwatch sort: {overlap}", file=sys.stderr)
        return 2
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
    remove = move and not dry_run
    settling = _Settling(cfg.settle_seconds) if remove else None

    def submit(path: Path) -> None:
        task = Task(
            path=str(path),
            source=str(path),
            remove_source=remove,
            rel_source=path.name,
            dry_run=dry_run,
        )
        pool.submit(task, settings)

    def report(result: Result) -> None:
        tally.add(result)
        if dry_run:
            _print_plan(result, planned)
        else:
            log_result(result)
        if bar is not None:
            bar.update(1)

    try:
        pool.start()
        files = walk_files(sources, [cfg.archive, cfg.quarantine])
        exhausted = False
        while True:
            if settling is not None:
                for settled in settling.ready(pool.idle):
                    submit(settled)
            while not exhausted and pool.idle and (settling is None or settling.has_room):
                path = next(files, None)
                if path is None:
                    exhausted = True
                    if settling is not None:
                        settling.walk_done()
                    break
                if settling is None or settling.take(path):
                    submit(path)
            if settling is not None and exhausted:
                for result in settling.give_up():
                    report(result)
            if exhausted and not pool.busy and (settling is None or not settling.pending):
                break
            timeout = 1.0 if settling is None else settling.wait(1.0)
            for done in pool.poll(timeout=timeout):
                report(done.result)
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
                    reason="still_changing",
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
