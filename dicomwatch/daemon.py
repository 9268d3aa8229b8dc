"""``dicomwatch run``: the watch daemon's parent process.

One thread (this one) owns every decision; the observer thread only queues paths, the
scanner thread only walks the inbox, the worker processes only file.  A file moves
through these states, each visible on disk or in memory, never both ways at once:

    seen (intake) -> settled -> claimed (renamed into inbox/.dicomwatch/claims/<node>/)
    -> in a worker -> filed (archive or quarantine copy durable) -> claim removed

Each concern is a part with its own state: :class:`~dicomwatch.intake.Intake` (events,
scans, settling), :class:`~dicomwatch.claims.Claims` (claim folder, node lock, recovery),
:class:`~dicomwatch.retries.Retries` (failures, back-off, stuck files), the timers, the
signals, and the result sinks.  :meth:`Daemon.step` is one turn of the loop and reads as
its table of contents.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dicomwatch.claims import Claims
from dicomwatch.config import Config, load_config, validate
from dicomwatch.decode import log_codecs
from dicomwatch.errors import ConfigError
from dicomwatch.indexsink import index_sinks
from dicomwatch.intake import Intake
from dicomwatch.logconfig import setup_logging
from dicomwatch.notify import Notifier
from dicomwatch.pool import WorkerPool
from dicomwatch.reasons import CRASH_REASONS, Reason
from dicomwatch.result import Result
from dicomwatch.retries import Next, Retries, RetryPolicy, decide, format_age
from dicomwatch.signals import Signals
from dicomwatch.sinks import Counters, LogSink, Sinks
from dicomwatch.sorter import EngineSettings, Task
from dicomwatch.staging import Staging, owner_name
from dicomwatch.timers import Every, Timers

log = logging.getLogger(__name__)

STATUS_SECONDS = 5.0
STUCK_CHECK_SECONDS = 5.0
FLUSH_SECONDS = 1.0
LOOP_WAIT_SECONDS = 0.25
ONCE_GRACE_SECONDS = 0.2
HOT_KEYS = frozenset(
    {
        "template",
        "decompress",
        "max_decoded_bytes",
        "settle_seconds",
        "rescan_seconds",
        "ignore",
        "observer",
        "polling_interval_seconds",
        "max_pending",
        "max_attempts",
        "retry_initial_seconds",
        "retry_max_seconds",
        "task_timeout_seconds",
        "stuck_warning_seconds",
        "shutdown_timeout_seconds",
        "summary_seconds",
        "empty_dir_grace_seconds",
        "fsync",
        "log_format",
        "log_level",
    }
)
"""Settings a SIGHUP applies to the running daemon; every other change waits for a restart."""


class Daemon:
    """The watch daemon: ``run`` = :meth:`start`, :meth:`step` until stopped, :meth:`stop`."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = dict(overrides or {})  # the command line's; they outlive a reload
        self.clock = clock
        self.node = cfg.effective_node_id
        self.notifier = notifier or Notifier()
        self.signals = Signals()
        self.claims = Claims(cfg.inbox, self.node, archive=cfg.archive, clock=clock)
        self.retries = Retries(clock, RetryPolicy.from_config(cfg))
        self.counters = Counters(clock)
        self.sinks = Sinks([LogSink(), self.counters, *index_sinks(cfg, owner_name(cfg, "run"))])
        self.pending: deque[Task] = deque()
        self.stopping = False
        self.once = False
        self._staging = Staging(
            cfg, owner_name(cfg, "run"), keep_processed=cfg.after_filing == "move"
        )
        self._settings: EngineSettings | None = None
        self._pool: WorkerPool | None = None
        self._intake: Intake | None = None
        self._timers = Timers()
        self._summary_mark = (clock(), 0)
        self._once_deadline: float | None = None
        self._locked = False

    # ----- lifecycle -------------------------------------------------------------------

    def run(self, *, once: bool = False) -> int:
        """Serve until a signal stops it (or, ``once``, until the inbox is done); exit status."""
        try:
            self.start(once=once)
        except ConfigError as exc:
            log.error("%s", exc)
            self.stop()
            return 78
        try:
            while not self.stopping and not self.done_once():
                self.step()
        finally:
            self.stop()
        return self.exit_status()

    def start(self, *, once: bool = False) -> None:
        """Lock the node, recover claims, start workers, intake, signals and timers."""
        self.once = once
        self.claims.lock()
        self._locked = True
        self._settings = self._staging.open()
        self._log_startup()
        self.claims.adopt_dead()
        self.pending.extend(self.claims.recover_own())
        self._pool = WorkerPool(
            self.cfg.effective_workers, memory_mb=self.cfg.worker_memory_mb, clock=self.clock
        )
        self._pool.start()
        self._intake = Intake(
            self.cfg,
            clock=self.clock,
            wake_fd=self.signals.wake_fd,
            once=once,
            tidy=lambda: self.claims.tidy(self.cfg.empty_dir_grace_seconds),
            after_rescan=lambda: self.retries.prune_claims(os.path.lexists),
        )
        self._intake.start()
        self.signals.install()
        self._start_timers(self.clock())
        self.notifier.ready(status="watching" if not once else "sorting once")

    def step(self) -> None:
        """One turn of the loop."""
        self.handle_signals()
        if self.stopping:
            return
        self.intake.pump()
        self.release_due_retries()
        self.claim_settled()
        self.dispatch()
        self.collect(timeout=self.wait_seconds())
        self.expire_overdue()
        self._timers.fire_due(self.clock())

    def stop(self) -> None:
        """Finish files in flight (within the timeout), hand the rest back, release all."""
        if self._intake is not None:
            self._intake.stop()
        if self._pool is not None:
            self._finish_in_flight(self._pool)
        for task in [*self.pending, *self.retries.take_all()]:
            self.claims.unclaim(task)
        self.pending.clear()
        self.sinks.flush()
        self.notifier.stopping()
        self._staging.close()
        self.signals.close()
        if self._locked:
            self.claims.unlock()
            self._locked = False
        if self._pool is not None:
            self._log_summary(self.clock(), final=True)
            self._pool = None

    def exit_status(self) -> int:
        """``--once``: 0 when every file was filed, 1 if any was quarantined or failed."""
        if self.once and self.counters.bad:
            return 1
        return 0

    def done_once(self) -> bool:
        """``--once``: the start-up scan is through and what settled is filed."""
        if not self.once or not self.intake.initial_scan_done:
            return False
        now = self.clock()
        if self._once_deadline is None:
            self._once_deadline = now + self.cfg.settle_seconds + ONCE_GRACE_SECONDS
        if now < self._once_deadline or self.pending or self.pool.busy:
            return False
        # Files that keep changing are left for a later run.
        due = self.intake.next_due()
        return due is None or due - now > self.cfg.settle_seconds

    @property
    def pool(self) -> WorkerPool:
        assert self._pool is not None, "the daemon is not started"
        return self._pool

    @property
    def intake(self) -> Intake:
        assert self._intake is not None, "the daemon is not started"
        return self._intake

    # ----- the steps -------------------------------------------------------------------

    def handle_signals(self) -> None:
        """SIGHUP reloads; the first SIGTERM/SIGINT stops taking files, a second exits now."""
        reload = False
        for signum in self.signals.take():
            if signum == signal.SIGHUP:
                reload = True
            elif self.stopping:
                log.warning(
                    "second %s: stopping now; files in flight stay claimed and are "
                    "filed on the next start",
                    signal.Signals(signum).name,
                )
                os._exit(128 + signum)
            else:
                log.info(
                    "%s: finishing files in flight (up to %.0f s), taking no new ones",
                    signal.Signals(signum).name,
                    self.cfg.shutdown_timeout_seconds,
                )
                self.notifier.stopping()
                self.stopping = True
        if reload:
            self.reload()

    def release_due_retries(self) -> None:
        """Files whose back-off has passed go back to the pending queue."""
        self.pending.extend(self.retries.release_due(self.clock()))

    def claim_settled(self) -> None:
        """Claim settled files, as many as the pending queue has room for."""
        for path in self.intake.ready(limit=self._room()):
            self._claim(path)

    def dispatch(self) -> None:
        """Hand pending files to idle workers."""
        assert self._settings is not None
        while self.pending and self.pool.idle:
            self.pool.submit(self.pending.popleft(), self._settings)

    def wait_seconds(self) -> float:
        """Until the next file may settle or a timer is due, at most ``LOOP_WAIT_SECONDS``.

        With the pending queue full, a settled file cannot be claimed until a worker
        finishes (which ends the wait anyway): waiting for its deadline would spin a core.
        """
        now = self.clock()
        deadlines = [self._timers.next_due()]
        if self._room() > 0:
            deadlines.append(self.intake.next_due())
        due = min((d for d in deadlines if d is not None), default=None)
        return LOOP_WAIT_SECONDS if due is None else min(LOOP_WAIT_SECONDS, max(0.0, due - now))

    def collect(self, timeout: float) -> None:
        """Wait for results, a signal or an event, and act on each result."""
        for done in self.pool.poll(timeout=timeout, extra=[self.signals.fd]):
            self.finished(done.task, done.result)
        self.signals.drain()

    def expire_overdue(self) -> None:
        """Kill workers over ``task_timeout_seconds``; their files count an attempt."""
        for done in self.pool.expire(self.cfg.task_timeout_seconds):
            self.finished(done.task, done.result)

    # ----- per file --------------------------------------------------------------------

    def _room(self) -> int:
        return self.cfg.max_pending - len(self.pending) - self.pool.busy

    def _claim(self, path: str) -> None:
        try:
            got = self.claims.claim(path)
        except OSError as exc:
            if self.retries.failed(path, Reason.CLAIM_FAILED, claim=True):
                log.warning(
                    "cannot file %s yet (%s): cannot claim: %s; will retry",
                    path,
                    Reason.CLAIM_FAILED,
                    exc.strerror,
                )
            return
        if got == "later":
            self.intake.again(path)
        elif isinstance(got, Task):
            self.retries.resolve(path)
            self.pending.append(got)

    def finished(self, task: Task, result: Result) -> None:
        """Act on one result as the retry policy says."""
        claim_gone = result.reason is Reason.VANISHED and not os.path.lexists(task.path)
        crashes = task.attempts + (1 if result.reason in CRASH_REASONS else 0)
        step = decide(
            result,
            task.attempts,
            self.retries.policy,
            stopping=self.stopping,
            claim_gone=claim_gone,
        )
        if step is Next.REPORT:
            self.claims.release(task)
            earlier = self.retries.resolve(task.path)
            if earlier is not None and earlier.failures:
                log.info("%s filed after %d failed attempts", task.source, earlier.failures)
            self.sinks.on_result(task, result)
        elif step is Next.FORGET:
            self.claims.release(task)
            self.retries.resolve(task.path)
            log.info("%s disappeared before it could be filed", task.source)
        elif step is Next.QUARANTINE_NOW:
            message = (
                f"{crashes} attempts each ended with the worker dying, running out of "
                f"memory or over its time limit ({result.message})"
            )
            forced = replace(
                task, attempts=crashes, quarantine_reason=(Reason.WORKER_CRASH, message)
            )
            self.retries.failed(task.path, result.reason or Reason.WORKER_CRASH)
            self.sinks.on_result(task, result)
            self.pending.appendleft(forced)
        else:
            self.retries.failed(task.path, result.reason or Reason.IO_ERROR)
            self.sinks.on_result(task, result)
            if step is Next.HAND_BACK:
                self.claims.unclaim(task)
            else:
                self.retries.back_off(task, crashes)

    # ----- stopping --------------------------------------------------------------------

    def _finish_in_flight(self, pool: WorkerPool) -> None:
        """Finish in-flight files within the timeout; a second signal stops at once.

        The timeout is measured in real seconds whatever the injected clock: it has to
        end before systemd's ``TimeoutStopSec`` does, and a hung worker must not make
        stopping wait for a clock that nothing advances.
        """
        self.stopping = True
        deadline = time.monotonic() + self.cfg.shutdown_timeout_seconds
        while pool.busy and time.monotonic() < deadline:
            second = self.signals.pending_stop()
            if second is not None:
                log.warning("second signal: stopping now")
                pool.terminate()
                os._exit(128 + second)
            for done in pool.poll(timeout=LOOP_WAIT_SECONDS, extra=[self.signals.fd]):
                self.finished(done.task, done.result)
            self.signals.drain()
        if pool.busy:
            log.warning(
                "%d files still in flight after %.0f s; they stay claimed and are filed "
                "on the next start",
                pool.busy,
                self.cfg.shutdown_timeout_seconds,
            )
            pool.terminate()
        else:
            pool.shutdown()

    # ----- timers and status -----------------------------------------------------------

    def _start_timers(self, now: float) -> None:
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            self._timers.add(Every("watchdog", watchdog, lambda _n: self.notifier.watchdog()))
        self._timers.add(
            Every("status", STATUS_SECONDS, lambda _n: self.notifier.status(self.status_line()))
        )
        self._summary = self._timers.add(
            Every(
                "summary",
                self.cfg.summary_seconds,
                self._log_summary,
                now + self.cfg.summary_seconds,
            )
        )
        self._timers.add(self.intake.rescan_timer)
        self._timers.add(self.intake.observer_timer)
        self._timers.add(
            Every(
                "stuck",
                STUCK_CHECK_SECONDS,
                lambda n: self.retries.warn_stuck(n, self.cfg.stuck_warning_seconds),
                now + STUCK_CHECK_SECONDS,
            )
        )
        self._timers.add(Every("flush", FLUSH_SECONDS, lambda _n: self.sinks.flush()))
        self._summary_mark = (now, 0)

    def status_line(self) -> str:
        stuck, oldest = self.retries.stuck(self.clock())
        stuck_text = f"stuck {stuck}" + (f" (oldest {format_age(oldest)})" if stuck else "")
        busy = self._pool.busy if self._pool is not None else 0
        settling = len(self._intake.tracker) if self._intake is not None else 0
        return (
            f"{self.counters.filed_text()}, failing {len(self.retries)}, {stuck_text}, "
            f"pending {len(self.pending) + busy}, settling {settling}"
        )

    def _log_summary(self, now: float, *, final: bool = False) -> None:
        since, filed_then = (self.counters.started, 0) if final else self._summary_mark
        rate = (self.counters.filed - filed_then) / max(now - since, 1e-9)
        oldest = self._intake.tracker.oldest_age() if self._intake is not None else 0.0
        log.info(
            "%s: %s; %.1f files/s; oldest waiting %.0f s; worker restarts %d",
            "final" if final else "summary",
            self.status_line(),
            rate,
            oldest,
            self._pool.crashes if self._pool is not None else 0,
        )
        self._summary_mark = (now, self.counters.filed)

    def _log_startup(self) -> None:
        cfg = self.cfg
        log.info(
            "dicomwatch starting%s: inbox=%s archive=%s quarantine=%s node=%s workers=%d "
            "settle=%.1fs rescan=%.0fs decompress=%s after_filing=%s",
            " (once)" if self.once else "",
            cfg.inbox,
            cfg.archive,
            cfg.quarantine,
            self.node,
            cfg.effective_workers,
            cfg.settle_seconds,
            cfg.rescan_seconds,
            "yes" if cfg.decompress else "no",
            cfg.after_filing,
        )
        log_codecs(cfg.decompress)

    # ----- reload ----------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: load the config file again and apply what can change while running."""
        self.notifier.reloading()
        new = self._load_for_reload()
        if new is not None:
            self.apply(new)
        self.notifier.ready(status=self.status_line())

    def _load_for_reload(self) -> Config | None:
        if self.config_path is None:
            log.info("SIGHUP: running on the built-in config; nothing to reload")
            return None
        try:
            new = load_config(self.config_path)
            if self.overrides:
                new = validate(replace(new, **self.overrides), source="command line")
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            return None
        old_values, new_values = self.cfg.to_dict(), new.to_dict()
        changed = [k for k in new_values if new_values[k] != old_values[k]]
        cold = [k for k in changed if k not in HOT_KEYS]
        if cold:
            log.warning("SIGHUP: %s changed; takes effect after a restart", ", ".join(cold))
            new = replace(new, **{k: getattr(self.cfg, k) for k in cold})
        log.info(
            "SIGHUP: config reloaded from %s (%s)",
            self.config_path,
            ", ".join(k for k in changed if k in HOT_KEYS) or "no changes",
        )
        return new

    def apply(self, new: Config) -> None:
        """Hand each reloadable setting to the part that uses it."""
        old, self.cfg = self.cfg, new
        now = self.clock()
        self.intake.reconfigure(old, new)
        self.retries.policy = RetryPolicy.from_config(new)
        if new.summary_seconds != old.summary_seconds:
            self._summary.interval = new.summary_seconds
            self._summary.next_at = min(self._summary.next_at, now + new.summary_seconds)
        setup_logging(new.log_format, new.log_level)
        self._settings = self._staging.settings_for(new)
