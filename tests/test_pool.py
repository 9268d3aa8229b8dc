"""WorkerPool with real worker processes: task order, prefetch, and dead workers."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from dicomwatch.config import Config
from dicomwatch.pool import Completion, WorkerPool
from dicomwatch.result import Outcome
from dicomwatch.sorter import EngineSettings, Task
from dicomwatch.staging import Staging


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[EngineSettings]:
    cfg = Config(inbox=tmp_path / "inbox", archive=tmp_path / "archive", quarantine=tmp_path / "q")
    for folder in (cfg.archive, cfg.quarantine):
        folder.mkdir()
    with Staging(cfg, owner="pooltest") as opened:
        yield opened


def collect(pool: WorkerPool, count: int, timeout: float = 30.0) -> list[Completion]:
    done: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        done.extend(pool.poll(timeout=0.2))
    assert len(done) == count, done
    return done


def test_each_worker_holds_up_to_depth_tasks_and_all_complete(
    settings: EngineSettings, make_dicom: Callable[..., Path]
) -> None:
    files = [make_dicom(f"f{i}.dcm", InstanceNumber=i + 1) for i in range(6)]
    pool = WorkerPool(2, depth=2)
    pool.start()
    try:
        assert pool.idle == 4
        for path in files[:4]:
            pool.submit(Task(str(path), path.name), settings)
        assert (pool.idle, pool.busy) == (0, 4)
        with pytest.raises(RuntimeError):
            pool.submit(Task(str(files[4]), files[4].name), settings)
        done = collect(pool, 4)
        for path in files[4:]:
            pool.submit(Task(str(path), path.name), settings)
        done += collect(pool, 2)
    finally:
        pool.shutdown()
    assert sorted(c.task.source for c in done) == sorted(p.name for p in files)
    assert all(c.result.outcome is Outcome.SORTED for c in done)
    assert len(list(settings.archive.rglob("*.dcm"))) == 6
    assert pool.busy == 0


def test_a_dead_worker_costs_only_the_task_it_was_working_on(
    settings: EngineSettings, make_dicom: Callable[..., Path]
) -> None:
    first = make_dicom("first.dcm", InstanceNumber=1)
    second = make_dicom("second.dcm", InstanceNumber=2)
    pool = WorkerPool(1, depth=2)
    pool.start()
    try:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # holds both tasks, has started neither
        pool.submit(Task(str(first), "first.dcm"), settings)
        pool.submit(Task(str(second), "second.dcm"), settings)
        os.kill(pid, signal.SIGKILL)
        done = {c.task.source: c.result for c in collect(pool, 2)}
        assert wait_for(lambda: pool.pids() != [pid] and len(pool.pids()) == 1)
    finally:
        pool.shutdown()
    assert done["first.dcm"].outcome is Outcome.FAILED
    assert done["first.dcm"].reason == "worker_crash"
    assert done["first.dcm"].retryable
    # The queued task was handed to the replacement worker, not charged an attempt.
    assert done["second.dcm"].outcome is Outcome.SORTED
    assert pool.crashes == 1
    (archived,) = settings.archive.rglob("*.dcm")
    assert archived.name.endswith(".2.dcm")


def test_tasks_of_a_dead_worker_are_placed_even_when_its_replacement_starts_late(
    settings: EngineSettings, make_dicom: Callable[..., Path]
) -> None:
    """The replacement could not be started at once (EAGAIN, say): the queued task must
    still reach the next worker, not wait for a wake-up that never comes."""
    first = make_dicom("first.dcm", InstanceNumber=1)
    second = make_dicom("second.dcm", InstanceNumber=2)
    pool = WorkerPool(1, depth=2)
    pool.start()
    real_spawn = pool._spawn
    failures = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]

    def spawn_failing_once() -> Any:
        if failures:
            raise failures.pop()
        return real_spawn()

    pool._spawn = spawn_failing_once  # type: ignore[method-assign]
    try:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        pool.submit(Task(str(first), "first.dcm"), settings)
        pool.submit(Task(str(second), "second.dcm"), settings)
        os.kill(pid, signal.SIGKILL)
        done = {c.task.source: c.result for c in collect(pool, 2, timeout=20)}
    finally:
        pool.shutdown()
    assert not failures  # the failing start really happened
    assert done["first.dcm"].reason == "worker_crash"
    assert done["second.dcm"].outcome is Outcome.SORTED
    assert pool.busy == 0
