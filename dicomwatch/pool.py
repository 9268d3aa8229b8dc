"""Worker processes that decode and file, each holding at most two tasks.

``concurrent.futures.ProcessPoolExecutor`` marks the whole pool broken when one worker
dies and cannot say which task killed it.  A decoder segfault or an out-of-memory kill
on one hostile file must cost that file one attempt, not every file in flight, so each
worker here has its own pipe and works through its tasks in order: the parent always
knows what a dead worker was doing (the oldest task without a result), replaces the
worker, reports that task as crashed and hands the others to the remaining workers.

A worker holds a second task so that it starts on it the moment it sends a result,
instead of idling for the round trip through a parent that competes with the workers
for the same cores.

Workers start from a fork server with the engine preloaded: a replacement is ready in
milliseconds, and no worker is forked from a parent that runs observer threads.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dicomwatch.reasons import Reason
from dicomwatch.result import Outcome, Result
from dicomwatch.sorter import EngineSettings, Task, process

log = logging.getLogger(__name__)

_CTX: Any = None

WORKER_MEMORY_FLOOR_MB = 1024
"""Least address space a worker is given by default.  A worker with everything
imported maps about 170 MiB of address space (decoders included) and about 50 MiB
resident; below this floor an ordinary image could not be decoded."""
WORKER_MEMORY_CEILING_MB = 16 * 1024
"""Most address space a worker is given by default: the default ``max_decoded_bytes``
(4 GiB) decoded once, its source, the parsed copy of the source and the imports, with
room to spare.  Raise ``worker_memory_mb`` together with ``max_decoded_bytes``."""


def _machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit where that is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total


def default_worker_memory_mb(workers: int) -> int:
    """The per-worker address-space ceiling used when ``worker_memory_mb`` is 0.

    The machine's memory shared out among the workers, so that all of them at their
    ceiling together cannot exhaust it, within ``WORKER_MEMORY_FLOOR_MB`` and
    ``WORKER_MEMORY_CEILING_MB``.  RLIMIT_AS counts address space, not resident memory,
    so the floor keeps room for what the libraries map but never touch.
    """
    share = _machine_memory_bytes() // max(1, workers) // (1024 * 1024)
    return max(WORKER_MEMORY_FLOOR_MB, min(share, WORKER_MEMORY_CEILING_MB))


def _context() -> Any:
    """The fork-server context, created once, with the heavy imports preloaded."""
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["dicomwatch.sorter", "dicomwatch.pool"])
        _CTX = ctx
    return _CTX


def _worker_main(conn: Connection, memory_mb: int) -> None:
    """Serve tasks until the parent says stop or goes away."""
    # The parent decides when work stops: a terminal's Ctrl-C or a SIGTERM sent to the
    # whole process group must not kill a worker halfway through a file.  The parent
    # ends workers through their pipe, or with SIGKILL when it must stop at once.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    settings: EngineSettings | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, new_settings = message
        if new_settings is not None:  # sent with the first task and after a reload only
            settings = new_settings
        assert settings is not None
        result = process(task, settings)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    tasks: deque[Task] = field(default_factory=deque)
    """Sent and without a result yet, oldest (the one being worked on) first."""
    settings: EngineSettings | None = None
    """The settings this worker holds; tasks carry settings only when they differ."""
    started: float = 0.0
    """When the worker began its oldest task (the pool's clock), for the time limit."""


@dataclass(frozen=True)
class Completion:
    """A finished task: its result, or ``crashed`` with the worker's exit code."""

    task: Task
    result: Result


class WorkerPool:
    """A fixed number of worker processes, each holding at most ``depth`` tasks."""

    def __init__(
        self,
        size: int,
        *,
        memory_mb: int = 0,
        depth: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``memory_mb`` caps each worker's address space; 0 means a default sized from
        the machine (:func:`default_worker_memory_mb`)."""
        self.size = size
        self.memory_mb = memory_mb if memory_mb > 0 else default_worker_memory_mb(size)
        self.depth = depth
        self.clock = clock
        self._workers: list[_Worker] = []
        self._orphans: deque[tuple[Task, EngineSettings]] = deque()
        """Tasks a dead worker held but had not started, waiting for a free slot."""
        self._spawn_failing = False
        self.crashes = 0
        self.timeouts = 0

    def start(self) -> None:
        self._top_up()

    def _top_up(self) -> None:
        """Bring the pool back to ``size`` workers.

        Starting a process can fail (the new child killed before it read its start-up
        data, a process limit, a vanished fork server).  That must never take the daemon
        down: the pool runs short and tries again on the next poll.
        """
        while len(self._workers) < self.size:
            try:
                self._workers.append(self._spawn())
            except OSError as exc:
                if not self._spawn_failing:
                    log.error("cannot start a worker process (%s); retrying", exc)
                self._spawn_failing = True
                return
            if self._spawn_failing:
                log.info("worker processes start again")
            self._spawn_failing = False

    def _spawn(self) -> _Worker:
        ctx = _context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main, args=(child, self.memory_mb), daemon=True, name="dicomwatch-worker"
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    @property
    def idle(self) -> int:
        """Free task slots: how many more tasks ``submit`` accepts now."""
        free = sum(self.depth - len(w.tasks) for w in self._workers)
        return max(0, free - len(self._orphans))

    @property
    def busy(self) -> int:
        """Tasks handed to the pool and not yet completed."""
        return sum(len(w.tasks) for w in self._workers) + len(self._orphans)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def in_flight(self) -> list[Task]:
        held = [task for w in self._workers for task in w.tasks]
        return held + [task for task, _ in self._orphans]

    def submit(self, task: Task, settings: EngineSettings) -> None:
        """Hand `task` to the least loaded worker (an idle one first)."""
        if not self.idle:
            raise RuntimeError("no idle worker")
        self._send(task, settings)

    def _send(self, task: Task, settings: EngineSettings) -> None:
        worker = min(self._workers, key=lambda w: len(w.tasks))
        if not worker.tasks:
            worker.started = self.clock()
        worker.tasks.append(task)
        # A worker that died while idle fails this send; ``poll`` then notices the
        # dead process, reports the task as crashed and replaces the worker.
        changed = settings is not worker.settings
        with contextlib.suppress(BrokenPipeError, OSError):
            worker.conn.send((task, settings if changed else None))
        worker.settings = settings

    def _place_orphans(self) -> None:
        while self._orphans and any(len(w.tasks) < self.depth for w in self._workers):
            self._send(*self._orphans.popleft())

    def wait_fds(self) -> list[Any]:
        """What ``multiprocessing.connection.wait`` should watch for this pool."""
        objs: list[Any] = []
        for worker in self._workers:
            objs.append(worker.conn)
            objs.append(worker.process.sentinel)
        return objs

    def poll(self, timeout: float | None = 0.0, extra: Sequence[Any] = ()) -> list[Completion]:
        """Collect finished tasks, waiting up to ``timeout``; replaces dead workers."""
        self._top_up()
        # Tasks of a dead worker wait here when no replacement could be started at once;
        # a new worker has nothing to report, so they must be placed before waiting.
        self._place_orphans()
        ready = multiprocessing.connection.wait([*self.wait_fds(), *extra], timeout)
        if not ready:
            return []
        done: list[Completion] = []
        for worker in list(self._workers):
            # Only the objects ``wait`` reported are looked at: polling every pipe and
            # every process on each call was most of the parent's own CPU time.
            lost = False
            if worker.conn in ready:
                try:
                    while True:
                        result = worker.conn.recv()
                        if worker.tasks:
                            done.append(Completion(worker.tasks.popleft(), result))
                            worker.started = self.clock()  # it starts on the next at once
                        if not worker.conn.poll():
                            break
                except (EOFError, OSError):
                    lost = True  # the process check below reports and replaces it
            if (lost or worker.process.sentinel in ready) and not worker.process.is_alive():
                self._bury(worker, done)
        self._top_up()
        self._place_orphans()
        return done

    def expire(self, limit_seconds: float) -> list[Completion]:
        """Kill every worker that has spent more than ``limit_seconds`` on one task.

        A hung decoder or a read stuck on a dead network share would otherwise hold its
        file, and a worker, for ever.  The task is reported failed with reason
        ``timeout`` (an attempt, like a crash); the worker's queued task is handed on.
        """
        if limit_seconds <= 0:
            return []
        now = self.clock()
        done: list[Completion] = []
        for worker in list(self._workers):
            if not worker.tasks or now - worker.started <= limit_seconds:
                continue
            task = worker.tasks[0]
            log.warning(
                "worker %s has spent %.0f s on %s (task_timeout_seconds %.0f); killing it",
                worker.process.pid,
                now - worker.started,
                task.source,
                limit_seconds,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid or 0, signal.SIGKILL)
            self.timeouts += 1
            self._bury(
                worker,
                done,
                reason=Reason.TIMEOUT,
                message=f"no result after {limit_seconds:.0f} s",
            )
        self._top_up()
        self._place_orphans()
        return done

    def _bury(
        self,
        worker: _Worker,
        done: list[Completion],
        *,
        reason: Reason = Reason.WORKER_CRASH,
        message: str | None = None,
    ) -> None:
        """Report a dead worker's task as failed and drop the worker (``_top_up`` replaces it)."""
        self._workers.remove(worker)
        worker.process.join(timeout=1)
        code = worker.process.exitcode
        worker.conn.close()
        if not worker.tasks:
            return
        task = worker.tasks.popleft()
        if message is None:
            self.crashes += 1
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            log.warning("worker %s died (%s) while filing %s", worker.process.pid, how, task.source)
            message = f"worker {how}"
        done.append(
            Completion(
                task,
                Result(
                    outcome=Outcome.FAILED,
                    source=task.source,
                    reason=reason,
                    message=message,
                    retryable=True,
                ),
            )
        )
        # Never started: no attempt is counted against them.
        settings = worker.settings
        assert settings is not None  # a worker is sent settings with its first task
        self._orphans.extend((queued, settings) for queued in worker.tasks)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask idle workers to stop; terminate any that do not within ``timeout``."""
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(1)
            worker.conn.close()
        self._workers.clear()

    def terminate(self) -> None:
        """Stop at once (second signal): in-flight files stay where they are, unharmed."""
        for worker in self._workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid or 0, signal.SIGKILL)
        for worker in self._workers:
            worker.process.join(1)
            worker.conn.close()
        self._workers.clear()
