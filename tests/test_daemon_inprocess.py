"""The daemon in this process: real folders, a real worker pool and watcher, real
signals, and a fake clock that the tests advance, so back-off, time limits, stuck files
and reloads are checked step by step instead of through a subprocess's log."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for

from dicomwatch.config import Config, load_config
from dicomwatch.daemon import HOT_KEYS, Daemon
from dicomwatch.logconfig import JsonFormatter, setup_logging
from dicomwatch.reasons import Reason
from dicomwatch.result import Outcome, Result
from dicomwatch.sorter import Task


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """A result sink that keeps every result with the (fake) time it arrived."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.results: list[tuple[float, Result]] = []

    def on_result(self, task: Task, result: Result) -> None:
        self.results.append((self.clock(), result))

    def flush(self) -> None:
        pass

    def outcomes(self) -> list[tuple[Outcome, Reason | None]]:
        return [(r.outcome, r.reason) for _, r in self.results]


BASE: dict[str, Any] = {
    "settle_seconds": 0.5,
    "rescan_seconds": 30.0,
    "workers": 1,
    "node_id": "t",
    "retry_initial_seconds": 2.0,
    "retry_max_seconds": 10.0,
    "empty_dir_grace_seconds": 3600.0,
    "shutdown_timeout_seconds": 3.0,
    "observer": "native",
}


class Harness:
    def __init__(self, root: Path, **overrides: Any) -> None:
        self.root = root
        self.inbox, self.archive = root / "inbox", root / "archive"
        for d in (self.inbox, self.archive, root / "quarantine"):
            d.mkdir(parents=True, exist_ok=True)
        self.values = {
            "inbox": str(self.inbox),
            "archive": str(self.archive),
            "quarantine": str(root / "quarantine"),
            "state_dir": str(root / "state"),
            **BASE,
            **overrides,
        }
        self.config_path = root / "config.yaml"
        self.write_config()
        self.clock = FakeClock()
        self.daemon = Daemon(self.load(), config_path=self.config_path, clock=self.clock)
        self.recorder = Recorder(self.clock)
        self.daemon.sinks.sinks.append(self.recorder)

    def load(self) -> Config:
        return load_config(self.config_path)

    def write_config(self, **changes: Any) -> None:
        self.values.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.values))

    def step_until(
        self, done: Callable[[], bool], *, advance: float | None = None, timeout: float = 30.0
    ) -> None:
        """Step until ``done()``, moving the fake clock on after each step: by ``advance``,
        or else by 0.05 s while files are in flight and 0.5 s while the daemon is idle."""
        deadline = time.monotonic() + timeout
        d = self.daemon
        while not done():
            assert time.monotonic() < deadline, self.recorder.outcomes()
            d.step()
            busy = d.pool.busy or d.pending or len(d.intake.tracker)
            self.clock.advance(advance if advance is not None else (0.05 if busy else 0.5))

    def results(self, outcome: Outcome) -> list[Result]:
        return [r for _, r in self.recorder.results if r.outcome is outcome]

    def hup(self) -> None:
        """A real SIGHUP to this process; the daemon's handler takes it on the next step."""
        os.kill(os.getpid(), signal.SIGHUP)
        self.daemon.step()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        h = Harness(tmp_path, **overrides)
        made.append(h)
        h.daemon.start()
        return h

    yield make
    for h in made:
        h.daemon.stop()
    setup_logging("text", "INFO")


def archived(archive: Path) -> list[Path]:
    return sorted(p for p in archive.rglob("*.dcm") if ".dicomwatch" not in p.parts)


# ----- retries --------------------------------------------------------------------------


def test_failures_back_off_doubling_then_file_once_the_fault_is_gone(
    harness: Callable[..., Harness], make_dicom: Callable[..., Path]
) -> None:
    h = harness()
    blocker = h.archive / "pid001"
    blocker.write_bytes(b"a file where the patient folder should be")
    src = make_dicom("a.dcm")
    shutil.copy(src, h.inbox / "a.dcm")
    h.step_until(lambda: len(h.results(Outcome.FAILED)) == 4)
    times = [t for t, r in h.recorder.results]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 2, 4, 8 s of back-off, doubling (plus at most one idle step to pick each up).
    assert all(d <= g <= d + 0.6 for d, g in zip((2, 4, 8), gaps, strict=True)), gaps
    assert {r.reason for r in h.results(Outcome.FAILED)} == {Reason.IO_ERROR}
    blocker.unlink()
    h.step_until(lambda: bool(h.results(Outcome.SORTED)))
    assert len(archived(h.archive)) == 1
    assert archived(h.archive)[0].read_bytes()[128:132] == b"DICM"
    # Every attempt was counted once: four failures, one filed.
    c = h.daemon.counters.outcomes
    assert (c[Outcome.FAILED], c[Outcome.SORTED]) == (4, 1)
    assert not (h.inbox / "a.dcm").exists()
    assert h.daemon.retries.stuck(h.clock()) == (0, 0.0)


# ----- the per-file time limit ----------------------------------------------------------


def stop_workers(d: Daemon) -> list[int]:
    pids = d.pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def test_a_wedged_worker_is_killed_at_the_time_limit_and_the_file_filed_on_retry(
    harness: Callable[..., Harness],
    make_dicom: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness(task_timeout_seconds=60.0)
    assert wait_for(lambda: len(h.daemon.pool.pids()) == 1)
    wedged = stop_workers(h.daemon)
    shutil.copy(make_dicom("a.dcm"), h.inbox / "a.dcm")
    h.step_until(lambda: h.daemon.pool.busy == 1)
    with caplog.at_level(logging.WARNING):
        h.step_until(lambda: h.clock() > 1030, advance=1.0)  # half the limit: nothing yet
        assert not h.recorder.results and h.daemon.pool.pids() == wedged
        h.step_until(lambda: bool(h.recorder.results), advance=1.0)
    assert h.recorder.outcomes() == [(Outcome.FAILED, Reason.TIMEOUT)]
    assert any("task_timeout_seconds 60" in r.getMessage() for r in caplog.records)
    assert wedged[0] not in h.daemon.pool.pids()
    h.step_until(lambda: bool(h.results(Outcome.SORTED)))
    assert len(archived(h.archive)) == 1


def test_a_file_that_times_out_max_attempts_times_is_quarantined(
    harness: Callable[..., Harness], make_dicom: Callable[..., Path]
) -> None:
    h = harness(task_timeout_seconds=5.0, max_attempts=2)
    assert wait_for(lambda: len(h.daemon.pool.pids()) == 1)
    stop_workers(h.daemon)
    shutil.copy(make_dicom("a.dcm"), h.inbox / "a.dcm")
    h.step_until(lambda: h.daemon.pool.busy == 1)
    h.step_until(lambda: bool(h.recorder.results), advance=0.5)
    assert wait_for(lambda: len(h.daemon.pool.pids()) == 1)
    stop_workers(h.daemon)  # the replacement hangs too
    h.step_until(lambda: bool(h.results(Outcome.QUARANTINED)), advance=0.5, timeout=60)
    assert h.recorder.outcomes() == [
        (Outcome.FAILED, Reason.TIMEOUT),
        (Outcome.FAILED, Reason.TIMEOUT),
        (Outcome.QUARANTINED, Reason.WORKER_CRASH),
    ]
    kept = list((h.root / "quarantine" / "worker_crash").glob("*.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes() == make_dicom_bytes(h)
    assert h.daemon.pool.timeouts == 2


def make_dicom_bytes(h: Harness) -> bytes:
    return (h.root / "made" / "a.dcm").read_bytes()


# ----- stuck files ----------------------------------------------------------------------


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable_folder(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """A folder nobody, root included, may rename files out of (``chattr +i``)."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make a folder the daemon cannot claim from")
    marked: list[Path] = []

    def mark(path: Path) -> None:
        try:
            chattr("+i", path)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"chattr +i is not supported here: {exc.stderr!r}")
        marked.append(path)

    yield mark
    for path in marked:
        chattr("-i", path)


def test_files_that_cannot_be_claimed_are_counted_stuck_and_warned_about(
    harness: Callable[..., Harness],
    make_dicom: Callable[..., Path],
    immutable_folder: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness(stuck_warning_seconds=120.0, rescan_seconds=5.0)
    study = h.inbox / "study1"
    study.mkdir()
    for i in range(2):
        shutil.copy(make_dicom(f"{i}.dcm"), study / f"{i}.dcm")
    immutable_folder(study)
    h.step_until(lambda: h.daemon.retries.stuck(h.clock())[0] == 2)
    assert "stuck 2 (oldest 0s)" in h.daemon.status_line()
    with caplog.at_level(logging.WARNING):
        # Rescans find them again; they stay stuck, and age.
        h.step_until(lambda: h.clock() > 1130, advance=1.0)
        assert "stuck 2 (oldest 2m" in h.daemon.status_line(), h.daemon.status_line()
        warnings = [r.getMessage() for r in caplog.records if "stuck for" in r.getMessage()]
        assert len(warnings) == 2 and all("group-writable" in w for w in warnings), warnings
        h.step_until(lambda: h.clock() > 1200, advance=1.0)
    assert len([r for r in caplog.records if "stuck for" in r.getMessage()]) == 2  # once each
    assert not h.recorder.results  # nothing was filed, nothing was lost
    chattr("-i", study)
    h.step_until(lambda: len(h.results(Outcome.SORTED)) == 2)
    assert h.daemon.retries.stuck(h.clock()) == (0, 0.0)
    assert "stuck 0," in h.daemon.status_line()


# ----- reload ---------------------------------------------------------------------------


def test_reload_of_ignore_stops_filing_newly_ignored_names(
    harness: Callable[..., Harness], make_dicom: Callable[..., Path]
) -> None:
    h = harness()
    h.write_config(ignore=[".*", "*.part", "*.tmp", "*.partial", "*~", "*.hold"])
    h.hup()
    assert h.daemon.cfg.ignore[-1] == "*.hold"
    shutil.copy(make_dicom("a.dcm"), h.inbox / "x.hold")
    shutil.copy(make_dicom("b.dcm"), h.inbox / "y.dcm")
    h.step_until(lambda: bool(h.results(Outcome.SORTED)))
    h.clock.advance(60)  # and a rescan
    h.step_until(lambda: not h.daemon.intake.scanning and h.clock() > 1100, advance=1.0)
    assert (h.inbox / "x.hold").is_file()
    assert len(h.recorder.results) == 1


def test_reload_of_ignore_drops_a_file_already_settling(
    harness: Callable[..., Harness], make_dicom: Callable[..., Path]
) -> None:
    h = harness(settle_seconds=5.0)
    shutil.copy(make_dicom("a.dcm"), h.inbox / "x.hold")
    h.step_until(lambda: len(h.daemon.intake.tracker) == 1)
    h.write_config(ignore=["*.hold"])
    h.hup()
    h.step_until(lambda: h.clock() > 1020)
    assert (h.inbox / "x.hold").is_file() and not h.recorder.results


def watcher_of(d: Daemon) -> Any:
    assert d.intake.watcher is not None
    return d.intake.watcher


def _our_handler() -> logging.Handler:
    (handler,) = [h for h in logging.getLogger().handlers if h.get_name() == "dicomwatch"]
    return handler


# key -> (new value, what the running daemon must show afterwards)
PROBES: dict[str, tuple[Any, Callable[[Daemon], object]]] = {
    "template": ("{PatientID}/{SOPInstanceUID}.dcm", lambda d: d._settings.template_text),  # type: ignore[union-attr]
    "decompress": (False, lambda d: d._settings.decompress),  # type: ignore[union-attr]
    "max_decoded_bytes": (1234, lambda d: d._settings.max_decoded_bytes),  # type: ignore[union-attr]
    "fsync": (False, lambda d: d._settings.fsync),  # type: ignore[union-attr]
    "settle_seconds": (7.0, lambda d: d.intake.tracker.settle_seconds),
    "rescan_seconds": (11.0, lambda d: d.intake.rescan_timer.interval),
    "ignore": (["*.hold"], lambda d: list(watcher_of(d)._patterns)),
    "observer": ("polling", lambda d: watcher_of(d).kind),
    "polling_interval_seconds": (0.3, lambda d: watcher_of(d)._interval),
    "max_pending": (3, lambda d: d._room() + d.pool.busy + len(d.pending)),
    "max_attempts": (7, lambda d: d.retries.policy.max_attempts),
    "retry_initial_seconds": (0.7, lambda d: d.retries.policy.initial_seconds),
    "retry_max_seconds": (9.0, lambda d: d.retries.policy.max_seconds),
    "task_timeout_seconds": (12.0, lambda d: d.cfg.task_timeout_seconds),
    "stuck_warning_seconds": (13.0, lambda d: d.cfg.stuck_warning_seconds),
    "shutdown_timeout_seconds": (14.0, lambda d: d.cfg.shutdown_timeout_seconds),
    "summary_seconds": (15.0, lambda d: d._summary.interval),
    "empty_dir_grace_seconds": (16.0, lambda d: d.cfg.empty_dir_grace_seconds),
    "log_format": ("json", lambda d: type(_our_handler().formatter).__name__),
    "log_level": ("WARNING", lambda d: logging.getLevelName(logging.getLogger().level)),
}
EXPECTED = {"observer": "polling", "log_format": JsonFormatter.__name__}


def test_every_reloadable_key_has_a_probe() -> None:
    assert set(PROBES) == HOT_KEYS


@pytest.mark.parametrize("key", sorted(PROBES))
def test_reload_applies_each_hot_key_to_the_part_that_uses_it(
    harness: Callable[..., Harness], key: str, caplog: pytest.LogCaptureFixture
) -> None:
    setup_logging("text", "INFO")
    h = harness(**({"observer": "native"} if key == "polling_interval_seconds" else {}))
    value, probe = PROBES[key]
    if key == "polling_interval_seconds":
        h.write_config(observer="polling")
        h.hup()
    before = probe(h.daemon)
    assert before != EXPECTED.get(key, value)
    h.write_config(**{key: value})
    with caplog.at_level(logging.INFO):
        h.hup()
        assert probe(h.daemon) == EXPECTED.get(key, value)  # (caplog restores the level)
    assert any(
        f"config reloaded from {h.config_path} ({key})" in r.getMessage() for r in caplog.records
    )


def test_reload_keeps_cold_keys_until_a_restart(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = harness()
    h.write_config(workers=2, settle_seconds=3.0)
    with caplog.at_level(logging.INFO):
        h.hup()
    assert h.daemon.cfg.workers == 1 and h.daemon.cfg.settle_seconds == 3.0
    assert any(
        "workers changed; takes effect after a restart" in r.getMessage() for r in caplog.records
    )


def test_a_bad_reload_keeps_the_running_config(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = harness()
    h.config_path.write_text("settle_seconds: -1\n")
    with caplog.at_level(logging.ERROR):
        h.hup()
    assert h.daemon.cfg.settle_seconds == 0.5
    assert any("config not reloaded" in r.getMessage() for r in caplog.records)


# ----- --once -----------------------------------------------------------------------------


def test_once_files_what_is_there_and_says_so_in_the_exit_status(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    h = Harness(tmp_path)
    shutil.copy(make_dicom("a.dcm"), h.inbox / "a.dcm")
    (h.inbox / "junk.txt").write_text("not dicom")
    h.daemon.start(once=True)
    try:
        h.step_until(lambda: h.daemon.done_once())
    finally:
        h.daemon.stop()
    assert sorted(o for o, _ in h.recorder.outcomes()) == [Outcome.QUARANTINED, Outcome.SORTED]
    assert h.daemon.exit_status() == 1
    assert len(archived(h.archive)) == 1 and not list(h.inbox.glob("*.dcm"))
