"""``dicomwatch run``: the watch daemon's lifecycle.

One thread (this one) owns every decision; the observer thread only queues paths, the
scanner thread only walks the inbox, the worker processes only file.  A file moves
through these states, each visible on disk or in memory, never both ways at once:

    seen (tracker) -> settled -> claimed (renamed into inbox/.dicomwatch/claims/<node>/)
    -> in a worker -> filed (archive or quarantine copy durable) -> claim removed

Claiming by ``rename`` is atomic even on a shared network filesystem, so two daemons
on one inbox never both take a file.  A claimed file belongs to exactly one node; on
start a daemon files whatever its previous run left claimed, and hands the claims of
nodes that are gone (their lock is free) back to the inbox.  Events are hints: the
start-up scan and the periodic rescans decide what exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, Full, Queue
from types import FrameType

from dicomwatch import watcher
from dicomwatch.archive import abandoned_locks, move_noreplace
from dicomwatch.config import Config, load_config
from dicomwatch.engine import Engine, log_codecs, owner_name
from dicomwatch.errors import ConfigError, WorkerCrashError
from dicomwatch.events import Outcome, Result
from dicomwatch.logconfig import log_result, setup_logging
from dicomwatch.notify import Notifier
from dicomwatch.pool import WorkerPool
from dicomwatch.settle import SettleTracker
from dicomwatch.sorter import EngineSettings, Task

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
TRACK_LIMIT = 20_000
"""Paths being settled at once; beyond it the scan pauses and events wait for a rescan."""
STATUS_SECONDS = 5.0
LOOP_WAIT_SECONDS = 0.25
NODE_LOCK_WAIT_SECONDS = 10.0
"""How long a busy node lock may be another node returning our claims, not a twin."""
_HOT_KEYS = frozenset(
    {
        "template",
        "decompress",
        "max_decoded_bytes",
        "settle_seconds",
        "rescan_seconds",
        "ignore",
        "max_pending",
        "max_attempts",
        "retry_initial_seconds",
        "retry_max_seconds",
        "shutdown_timeout_seconds",
        "summary_seconds",
        "empty_dir_grace_seconds",
        "fsync",
        "log_format",
        "log_level",
        "polling_interval_seconds",
    }
)


@dataclass
class _Retry:
    failures: int
    reason: str


@dataclass
class _Counters:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    bytes: int = 0

    def add(self, result: Result) -> None:
        self.outcomes[result.outcome] += 1
        self.bytes += result.bytes

    @property
    def filed(self) -> int:
        return sum(v for k, v in self.outcomes.items() if k is not Outcome.FAILED)


class _Scanner(threading.Thread):
    """Walks the inbox and feeds a bounded queue: a huge backlog is streamed, not listed."""

    def __init__(
        self,
        inbox: Path,
        ignore: tuple[str, ...],
        out: Queue[tuple[str, str] | None],
        stop: threading.Event,
        tidy: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="dicomwatch-scan", daemon=True)
        self.inbox, self.ignore, self.out, self.stop_event, self.tidy = (
            inbox,
            ignore,
            out,
            stop,
            tidy,
        )

    def run(self) -> None:
        try:
            for item in watcher.scan(self.inbox, self.ignore):
                while not self.stop_event.is_set():
                    try:
                        self.out.put(item, timeout=0.5)
                        break
                    except Full:
                        continue
                if self.stop_event.is_set():
                    return
            if self.tidy is not None and not self.stop_event.is_set():
                self.tidy()
        except OSError as exc:
            log.error("scan of %s failed: %s", self.inbox, exc)
        finally:
            with contextlib.suppress(Full):
                self.out.put(None, timeout=5)


class Daemon:
    """The watch daemon; ``run`` returns the process exit status."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.clock = clock
        self.node = cfg.effective_node_id
        self.claims_root = cfg.inbox / watcher.INTERNAL_DIR / CLAIMS_DIR
        self.claims = self.claims_root / self.node
        self.counters = _Counters()
        self.pending: deque[Task] = deque()
        self.claimed: set[str] = set()
        self.retries: dict[str, _Retry] = {}
        self.backoff: list[tuple[float, int, Task]] = []
        self._seq = 0
        self._signals: list[int] = []
        self._stopping = False
        self._reload = False
        self._noted_special: set[str] = set()
        self._known_claim_dirs: set[str] = set()
        self._lock_fd: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # ----- lifecycle -------------------------------------------------------------------

    def run(self, *, once: bool = False) -> int:
        cfg = self.cfg
        notifier = Notifier()
        try:
            self._take_node_lock()
        except ConfigError as exc:
            log.error("%s", exc)
            return 78
        engine = Engine(cfg, owner_name(cfg, "run"), keep_processed=cfg.after_filing == "move")
        settings = engine.open()
        self._log_startup(once)
        self._adopt_dead_claims()
        self._recover_own_claims()
        pool = WorkerPool(cfg.effective_workers, memory_mb=cfg.worker_memory_mb)
        pool.start()
        self.tracker = SettleTracker(cfg.settle_seconds, clock=self.clock)
        obs: watcher.InboxWatcher | None = None
        if not once:
            obs = watcher.InboxWatcher(
                cfg.inbox,
                observer=cfg.observer,
                ignore=cfg.ignore,
                polling_interval_seconds=cfg.polling_interval_seconds,
                wake_fd=self._wake_w,
            )
            obs.start()
            log.info("watching %s with the %s observer", cfg.inbox, obs.kind)
        old_handlers = self._install_signals()
        scan_stop = threading.Event()
        scan_q: Queue[tuple[str, str] | None] = Queue(maxsize=2048)
        scanner: _Scanner | None = _Scanner(cfg.inbox, cfg.ignore, scan_q, scan_stop)
        assert scanner is not None
        scanner.start()
        scan_is_periodic = False
        scan_found = 0
        started = self.clock()
        next_rescan = started + cfg.rescan_seconds
        next_status = started
        next_summary = started + cfg.summary_seconds
        watchdog_every = notifier.watchdog_interval()
        next_watchdog = started
        summary_mark = (started, 0)
        once_deadline: float | None = None
        rescan_wanted = False
        notifier.ready(status="watching" if not once else "sorting once")
        try:
            while True:
                now = self.clock()
                if self._signals:
                    self._handle_signals(notifier, obs)
                if self._reload:
                    self._reload = False
                    notifier.reloading()
                    settings = self._do_reload(engine, settings, pool)
                    notifier.ready(status=self._status_line(pool))
                if self._stopping:
                    break
                # 1. events (hints) and scan results (the record) feed the tracker
                if obs is not None:
                    for path, closed in obs.drain(max_items=TRACK_LIMIT):
                        if not self._consider(path, closed=closed):
                            rescan_wanted = True
                    for _folder in obs.drain_dirs():
                        rescan_wanted = True
                    if obs.take_overflow():
                        rescan_wanted = True
                while scanner is not None and len(self.tracker) < TRACK_LIMIT:
                    try:
                        item = scan_q.get_nowait()
                    except Empty:
                        break
                    if item is None:
                        scanner.join()
                        scanner = None
                        if scan_is_periodic and scan_found:
                            log.info("rescan found %d files that no event announced", scan_found)
                        if once and once_deadline is None:
                            once_deadline = self.clock() + self.cfg.settle_seconds + 0.2
                        break
                    path, kind = item
                    if kind != "file":
                        self._note_special(path, kind)
                        continue
                    if path not in self.tracker and self._consider(path) and scan_is_periodic:
                        scan_found += 1
                # 2. retries whose back-off has passed go back to settling
                while self.backoff and self.backoff[0][0] <= now and not self._stopping:
                    _, _, task = heapq.heappop(self.backoff)
                    self.pending.append(task)
                # 3. settled files are claimed, as many as the pending queue has room for
                room = self.cfg.max_pending - len(self.pending) - pool.busy
                if room > 0:
                    for path in self.tracker.ready(limit=room):
                        self._claim(path)
                for path, kind in self.tracker.drain_special():
                    self._note_special(path, kind)
                # 4. hand claimed files to idle workers
                while self.pending and pool.idle:
                    pool.submit(self.pending.popleft(), settings)
                # 5. wait for results, a signal, or the next deadline.  With the pending
                # queue full, a due file cannot be claimed until a worker finishes (which
                # ends the wait anyway): waiting for its deadline would spin a core.
                due = self.tracker.next_due()
                if self.cfg.max_pending - len(self.pending) - pool.busy <= 0:
                    due = None
                wait = (
                    LOOP_WAIT_SECONDS
                    if due is None
                    else min(LOOP_WAIT_SECONDS, max(0.0, due - now))
                )
                for done in pool.poll(timeout=wait, extra=[self._wake_r]):
                    self._finished(done.task, done.result)
                self._drain_wake()
                # 6. housekeeping
                now = self.clock()
                if obs is not None and not obs.alive:
                    # watchdog can stop watching without an error (an inbox that read as
                    # missing during a network outage); start a new observer and rescan.
                    log.warning("the %s observer stopped; starting a new one", obs.kind)
                    obs.stop()
                    obs = watcher.InboxWatcher(
                        cfg.inbox,
                        observer=cfg.observer,
                        ignore=self.cfg.ignore,
                        polling_interval_seconds=cfg.polling_interval_seconds,
                        wake_fd=self._wake_w,
                    )
                    try:
                        obs.start()
                    except OSError as exc:
                        log.error("cannot watch %s (%s); relying on rescans", cfg.inbox, exc)
                        obs = None
                    rescan_wanted = True
                if watchdog_every and now >= next_watchdog:
                    notifier.watchdog()
                    next_watchdog = now + watchdog_every
                if now >= next_status:
                    notifier.status(self._status_line(pool))
                    next_status = now + STATUS_SECONDS
                if now >= next_summary:
                    self._log_summary(pool, summary_mark, now)
                    summary_mark = (now, self.counters.filed)
                    next_summary = now + self.cfg.summary_seconds
                if not once and scanner is None and (now >= next_rescan or rescan_wanted):
                    if rescan_wanted and now < next_rescan:
                        log.info(
                            "rescanning the inbox early (events were dropped or a folder "
                            "was moved in)"
                        )
                    rescan_wanted = False
                    scan_is_periodic, scan_found = True, 0
                    scanner = _Scanner(
                        cfg.inbox, self.cfg.ignore, scan_q, scan_stop, tidy=self._tidy_folders
                    )
                    scanner.start()
                    next_rescan = now + self.cfg.rescan_seconds
                if (
                    once
                    and once_deadline is not None
                    and now >= once_deadline
                    and not self.pending
                    and not pool.busy
                    and (not self.tracker or self._nothing_due_soon(now))
                ):
                    break
        finally:
            scan_stop.set()
            if obs is not None:
                obs.stop()
            self._shutdown(pool, notifier)
            engine.close()
            self._restore_signals(old_handlers)
            self._release_node_lock()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._log_summary(pool, (started, 0), self.clock(), final=True)
        if once:
            bad = (
                self.counters.outcomes[Outcome.QUARANTINED] + self.counters.outcomes[Outcome.FAILED]
            )
            return 0 if bad == 0 else 1
        return 0

    def _nothing_due_soon(self, now: float) -> bool:
        """In ``--once`` mode, files that keep changing are left for a later run."""
        due = self.tracker.next_due()
        return due is None or due - now > self.cfg.settle_seconds

    def _log_startup(self, once: bool) -> None:
        cfg = self.cfg
        log.info(
            "dicomwatch starting%s: inbox=%s archive=%s quarantine=%s node=%s workers=%d "
            "settle=%.1fs rescan=%.0fs decompress=%s after_filing=%s",
            " (once)" if once else "",
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

    # ----- signals ---------------------------------------------------------------------

    def _install_signals(self) -> dict[int, object]:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old: dict[int, object] = {}

        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signals.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
        return old

    def _restore_signals(self, old: dict[int, object]) -> None:
        for sig, prev in old.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        signal.set_wakeup_fd(-1)

    def _handle_signals(self, notifier: Notifier, obs: watcher.InboxWatcher | None) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload = True
                continue
            if self._stopping:
                log.warning(
                    "second %s: stopping now; files in flight stay claimed and are "
                    "filed on the next start",
                    signal.Signals(signum).name,
                )
                os._exit(128 + signum)
            log.info(
                "%s: finishing files in flight (up to %.0f s), taking no new ones",
                signal.Signals(signum).name,
                self.cfg.shutdown_timeout_seconds,
            )
            notifier.stopping()
            self._stopping = True

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _shutdown(self, pool: WorkerPool, notifier: Notifier) -> None:
        """Finish in-flight files within the timeout; hand unstarted claims back."""
        deadline = self.clock() + self.cfg.shutdown_timeout_seconds
        while pool.busy and self.clock() < deadline:
            if self._signals and any(s != signal.SIGHUP for s in self._signals):
                log.warning("second signal: stopping now")
                pool.terminate()
                os._exit(128 + self._signals[0])
            for done in pool.poll(timeout=0.25, extra=[self._wake_r]):
                self._finished(done.task, done.result, stopping=True)
            self._drain_wake()
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
        while self.pending:
            self._unclaim(self.pending.popleft())
        while self.backoff:
            self._unclaim(heapq.heappop(self.backoff)[2])
        notifier.stopping()

    # ----- per file --------------------------------------------------------------------

    def _consider(self, path: str, *, closed: bool = False) -> bool:
        """Start or restart the settle timer; False when the tracker is full.

        A close-write hint does not shorten the wait: a sender that reopens the file for
        each chunk (``cat >>`` in a loop, a resumed upload) closes it after every chunk,
        and a file growing with pauses shorter than ``settle_seconds`` must never be
        claimed part-written.
        """
        closed = False
        if path in self.tracker:
            self.tracker.touch(path, closed=closed)
            return True
        if len(self.tracker) >= TRACK_LIMIT:
            return False
        self.tracker.touch(path, closed=closed)
        return True

    def _note_special(self, path: str, kind: str) -> None:
        if path in self._noted_special:
            return
        if len(self._noted_special) > 10_000:
            self._noted_special.clear()
        self._noted_special.add(path)
        log.warning("left alone: %s is a %s, not a regular file", path, kind)

    def _claim(self, path: str) -> None:
        """Take a settled file by renaming it into our claim folder (atomic, one winner)."""
        inbox = str(self.cfg.inbox)
        rel = os.path.relpath(path, inbox)
        if rel.startswith(".."):
            return
        claim = os.path.join(self.claims, rel)
        if claim in self.claimed or os.path.lexists(claim):
            # An earlier file of the same name is still ours; settle this one again later.
            self.tracker.touch(path)
            return
        try:
            parent = os.path.dirname(claim)
            if parent not in self._known_claim_dirs:
                os.makedirs(parent, exist_ok=True)
                if len(self._known_claim_dirs) > 4096:
                    self._known_claim_dirs.clear()
                self._known_claim_dirs.add(parent)
            os.rename(path, claim)
        except FileNotFoundError:
            self._known_claim_dirs.discard(os.path.dirname(claim))
            if os.path.lexists(path):
                self.tracker.touch(path)  # our claim folder vanished; try again
            return  # else: taken by another daemon, or removed by the sender
        except OSError as exc:
            self._note_failure(path, "claim_failed", f"cannot claim: {exc.strerror}")
            return
        self.claimed.add(claim)
        self.pending.append(Task(path=claim, source=path, remove_source=True, rel_source=rel))

    def _unclaim(self, task: Task) -> None:
        """Put a claimed file back under its inbox name, never over a newer file."""
        try:
            move_noreplace(task.path, task.source)
        except FileExistsError:
            return  # stays claimed; filed on the next start
        except FileNotFoundError:
            self.claimed.discard(task.path)
            return
        except OSError as exc:
            log.warning("cannot return %s to the inbox: %s", task.source, exc.strerror)
            return
        self.claimed.discard(task.path)

    def _note_failure(self, key: str, reason: str, message: str) -> bool:
        """Remember a retryable failure; True if it is new or changed (worth a log line)."""
        previous = self.retries.get(key)
        if previous is not None and previous.reason == reason:
            previous.failures += 1
            return False
        failures = previous.failures + 1 if previous else 1
        self.retries[key] = _Retry(failures, reason)
        log.warning("cannot file %s yet (%s): %s; will retry", key, reason, message)
        return True

    def _finished(self, task: Task, result: Result, *, stopping: bool = False) -> None:
        if result.outcome is not Outcome.FAILED:
            self.claimed.discard(task.path)
            state = self.retries.pop(task.path, None)
            if state is not None and state.failures:
                log.info("%s filed after %d failed attempts", task.source, state.failures)
            self.counters.add(result)
            log_result(result)
            return
        if result.reason == "vanished" and not os.path.lexists(task.path):
            # Removed by someone else after we claimed it: nothing left to file or lose.
            self.claimed.discard(task.path)
            self.retries.pop(task.path, None)
            log.info("%s disappeared before it could be filed", task.source)
            return
        crash = result.reason in ("worker_crash", "out_of_memory")
        attempts = task.attempts + (1 if crash else 0)
        if crash and attempts >= self.cfg.max_attempts:
            message = (
                f"{attempts} attempts each ended with the worker dying or running out of "
                f"memory ({result.message})"
            )
            forced = replace(
                task, attempts=attempts, quarantine_reason=(WorkerCrashError.reason, message)
            )
            self.pending.appendleft(forced)
            return
        state = self.retries.get(task.path)
        if state is None or state.reason != result.reason:
            self.counters.add(result)
            log_result(result)
        failures = state.failures + 1 if state else 1
        self.retries[task.path] = _Retry(failures, result.reason or "failed")
        if stopping or self._stopping:
            self._unclaim(task)
            return
        delay = min(
            self.cfg.retry_initial_seconds * (2 ** (failures - 1)), self.cfg.retry_max_seconds
        )
        self._seq += 1
        heapq.heappush(
            self.backoff, (self.clock() + delay, self._seq, replace(task, attempts=attempts))
        )

    # ----- claims of this and other nodes ------------------------------------------------

    def _take_node_lock(self) -> None:
        """Lock ``<node>.lock``; a lock held past ``NODE_LOCK_WAIT_SECONDS`` means a twin.

        Another node returning our claims after a crash (``_adopt_dead_claims``) holds
        our lock while it moves them, then removes the lock file: so a busy lock is
        retried for a while before we refuse to start (exit 78 is never restarted), and
        a lock taken on a file that was removed meanwhile is taken again on the new one.
        Our claim folder is made only once the lock is ours: the adopter removes it.
        """
        self.claims_root.mkdir(parents=True, exist_ok=True)
        path = self.claims_root / f"{self.node}.lock"
        deadline = time.monotonic() + NODE_LOCK_WAIT_SECONDS
        waited = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(fd)
                if time.monotonic() < deadline:
                    if not waited:
                        log.info(
                            "node lock %s is busy (another node may be returning our "
                            "claims); waiting",
                            path,
                        )
                    waited = True
                    time.sleep(0.1)
                    continue
                raise ConfigError(
                    f"another dicomwatch with node_id {self.node!r} is running on "
                    f"{self.cfg.inbox}; give each daemon its own node_id"
                ) from exc
            with contextlib.suppress(FileNotFoundError):
                named, held = os.stat(path), os.fstat(fd)
                if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    break
            os.close(fd)
        self._lock_fd = fd
        self.claims.mkdir(parents=True, exist_ok=True)

    def _release_node_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover_own_claims(self) -> None:
        """Files our previous run had claimed are complete: file them first."""
        count = 0
        for path, kind in watcher.scan(self.claims, ()):
            if kind != "file":
                continue
            rel = os.path.relpath(path, self.claims)
            source = os.path.join(self.cfg.inbox, rel)
            self.claimed.add(path)
            self.pending.append(Task(path=path, source=source, remove_source=True, rel_source=rel))
            count += 1
        if count:
            log.info("recovered %d files claimed by an earlier run of node %s", count, self.node)

    def _adopt_dead_claims(self) -> None:
        """Hand claims of daemons that are gone (lock free) back to the inbox."""
        for lock in abandoned_locks(self.claims_root, skip=self.node):
            node = lock.stem
            folder = self.claims_root / node
            moved = 0
            for path, kind in watcher.scan(folder, ()):
                if kind != "file":
                    continue
                target = self.cfg.inbox / os.path.relpath(path, folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    move_noreplace(path, str(target))
                except FileExistsError:
                    continue
                moved += 1
            if moved:
                log.info("returned %d files claimed by stopped node %s to the inbox", moved, node)
            if not any(kind == "file" for _, kind in watcher.scan(folder, ())):
                shutil.rmtree(folder, ignore_errors=True)
                lock.unlink(missing_ok=True)

    # ----- housekeeping ----------------------------------------------------------------

    def _tidy_folders(self) -> None:
        """Remove empty inbox sub-folders (and claim sub-folders) after a grace period.

        Runs on the scanner thread.  ``rmdir`` only ever removes an empty folder, and the
        grace period (on the folder's mtime, which changes whenever an entry is added)
        leaves alone folders a sender has just made.
        """
        grace = self.cfg.empty_dir_grace_seconds
        cutoff = time.time() - grace
        for top in (self.cfg.inbox, self.claims):
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                if Path(dirpath) == top or (
                    top == self.cfg.inbox
                    and watcher.INTERNAL_DIR in Path(dirpath).relative_to(top).parts
                ):
                    continue
                if filenames or (
                    dirnames and any(os.path.lexists(os.path.join(dirpath, d)) for d in dirnames)
                ):
                    continue
                try:
                    st = os.lstat(dirpath)
                    if stat.S_ISDIR(st.st_mode) and st.st_mtime < cutoff:
                        os.rmdir(dirpath)
                        self._known_claim_dirs.discard(dirpath)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                        log.debug("cannot remove empty folder %s: %s", dirpath, exc)

    def _status_line(self, pool: WorkerPool) -> str:
        c = self.counters.outcomes
        return (
            f"filed {self.counters.filed} (sorted {c[Outcome.SORTED]}, duplicates "
            f"{c[Outcome.DUPLICATE]}, conflicts {c[Outcome.CONFLICT]}, quarantined "
            f"{c[Outcome.QUARANTINED]}), failing {len(self.backoff)}, pending "
            f"{len(self.pending) + pool.busy}, settling {len(self.tracker)}"
        )

    def _log_summary(
        self, pool: WorkerPool, mark: tuple[float, int], now: float, final: bool = False
    ) -> None:
        since, filed_then = mark
        rate = (self.counters.filed - filed_then) / max(now - since, 1e-9)
        oldest = self.tracker.oldest_age() if hasattr(self, "tracker") else 0.0
        log.info(
            "%s: %s; %.1f files/s; oldest waiting %.0f s; worker restarts %d",
            "final" if final else "summary",
            self._status_line(pool),
            rate,
            oldest,
            pool.crashes,
        )

    # ----- reload ------------------------------------------------------------------------

    def _do_reload(
        self, engine: Engine, settings: EngineSettings, pool: WorkerPool
    ) -> EngineSettings:
        if self.config_path is None:
            log.info("SIGHUP: running on the built-in config; nothing to reload")
            return settings
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            return settings
        changed = [k for k in new.to_dict() if new.to_dict()[k] != self.cfg.to_dict()[k]]
        cold = [k for k in changed if k not in _HOT_KEYS]
        if cold:
            log.warning("SIGHUP: %s changed; takes effect after a restart", ", ".join(cold))
            new = replace(new, **{k: getattr(self.cfg, k) for k in cold})
        self.cfg = new
        if self.tracker is not None:
            self.tracker.settle_seconds = new.settle_seconds
        setup_logging(new.log_format, new.log_level)
        log.info(
            "SIGHUP: config reloaded from %s (%s)",
            self.config_path,
            ", ".join(changed) if changed else "no changes",
        )
        return engine.settings_for(new)
