"""The parent's pure parts: retry policy, back-off queue, timers, counters, log sink."""

from __future__ import annotations

import logging

import pytest

from dicomwatch.reasons import CRASH_REASONS, Reason
from dicomwatch.result import Outcome, Result
from dicomwatch.retries import Next, Retries, RetryPolicy, decide, format_age
from dicomwatch.sinks import Counters, LogSink
from dicomwatch.sorter import Task
from dicomwatch.timers import Every, Timers

POLICY = RetryPolicy(max_attempts=3, initial_seconds=0.2, max_seconds=1.0)
TASK = Task(path="/in/.dicomwatch/claims/n/x.dcm", source="/in/x.dcm")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def failed(reason: Reason) -> Result:
    return Result(outcome=Outcome.FAILED, source="x", reason=reason, retryable=True)


def test_filed_results_are_reported_whatever_came_before() -> None:
    for outcome in (Outcome.SORTED, Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.QUARANTINED):
        result = Result(outcome=outcome, source="x")
        assert decide(result, 5, POLICY, stopping=True, claim_gone=True) is Next.REPORT


def test_a_vanished_claim_is_forgotten_only_when_the_file_is_really_gone() -> None:
    result = failed(Reason.VANISHED)
    assert decide(result, 0, POLICY, stopping=False, claim_gone=True) is Next.FORGET
    assert decide(result, 0, POLICY, stopping=False, claim_gone=False) is Next.BACK_OFF


@pytest.mark.parametrize("reason", sorted(CRASH_REASONS))
def test_crashes_quarantine_on_the_last_attempt(reason: Reason) -> None:
    result = failed(reason)
    assert decide(result, 0, POLICY, stopping=False, claim_gone=False) is Next.BACK_OFF
    assert decide(result, 1, POLICY, stopping=False, claim_gone=False) is Next.BACK_OFF
    assert decide(result, 2, POLICY, stopping=False, claim_gone=False) is Next.QUARANTINE_NOW


def test_environment_failures_never_quarantine() -> None:
    for reason in (Reason.DISK_FULL, Reason.PERMISSION_DENIED, Reason.IO_ERROR):
        assert decide(failed(reason), 99, POLICY, stopping=False, claim_gone=False) is Next.BACK_OFF


def test_stopping_hands_failures_back() -> None:
    assert decide(failed(Reason.DISK_FULL), 0, POLICY, stopping=True, claim_gone=False) is (
        Next.HAND_BACK
    )


def test_delay_doubles_and_is_capped() -> None:
    assert [POLICY.delay(n) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]


def test_back_off_releases_each_task_after_its_delay() -> None:
    clock = Clock()
    retries = Retries(clock, RetryPolicy(max_attempts=3, initial_seconds=2.0, max_seconds=10.0))
    schedule = []
    for _ in range(4):
        retries.failed(TASK.path, Reason.DISK_FULL)
        retries.back_off(TASK, crashes=0)
        start = clock.now
        while not (due := retries.release_due(clock.now)):
            clock.now += 1.0
        assert due == [TASK]
        schedule.append(clock.now - start)
    assert schedule == [2.0, 4.0, 8.0, 10.0]
    assert len(retries) == 0


def test_back_off_carries_the_crash_count_in_the_task() -> None:
    retries = Retries(Clock(), POLICY)
    retries.failed(TASK.path, Reason.WORKER_CRASH)
    retries.back_off(TASK, crashes=2)
    assert [t.attempts for t in retries.take_all()] == [2]


def test_failed_says_when_the_reason_is_new() -> None:
    retries = Retries(Clock(), POLICY)
    assert retries.failed("a", Reason.DISK_FULL) is True
    assert retries.failed("a", Reason.DISK_FULL) is False
    assert retries.failed("a", Reason.READ_ONLY) is True
    resolved = retries.resolve("a")
    assert resolved is not None and resolved.failures == 3
    assert retries.resolve("a") is None


def test_stuck_counts_failing_and_unclaimable_files_from_their_first_failure() -> None:
    clock = Clock()
    retries = Retries(clock, POLICY)
    assert retries.stuck(clock.now) == (0, 0.0)
    retries.failed("/in/a", Reason.CLAIM_FAILED, claim=True)
    clock.now += 30
    retries.failed(TASK.path, Reason.DISK_FULL)
    clock.now += 100
    retries.failed("/in/a", Reason.CLAIM_FAILED, claim=True)
    assert retries.stuck(clock.now) == (2, 130.0)
    retries.prune_claims(lambda path: False)
    assert retries.stuck(clock.now) == (1, 100.0)


def test_stuck_warning_is_logged_once_per_file(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    retries = Retries(clock, POLICY)
    retries.failed("/in/a", Reason.CLAIM_FAILED, claim=True)
    with caplog.at_level(logging.WARNING):
        retries.warn_stuck(clock.now + 599, 600)
        assert not caplog.records
        retries.warn_stuck(clock.now + 601, 600)
        retries.warn_stuck(clock.now + 700, 600)
    assert len(caplog.records) == 1
    assert "stuck for 10m01s: /in/a has failed 1 times" in caplog.records[0].getMessage()
    assert "group-writable" in caplog.records[0].getMessage()


def test_format_age() -> None:
    assert [format_age(s) for s in (0, 59.9, 60, 130, 3599, 3600, 11_100)] == [
        "0s",
        "59s",
        "1m00s",
        "2m10s",
        "59m59s",
        "1h00m",
        "3h05m",
    ]


def test_every_fires_on_the_injected_clock_and_waits_while_refused() -> None:
    fired: list[float] = []
    allow = [True]

    def action(now: float) -> bool:
        if allow[0]:
            fired.append(now)
        return allow[0]

    timer = Every("t", 10.0, action, next_at=5.0)
    timers = Timers([timer])
    for now in (0.0, 4.9, 5.0, 6.0, 14.9, 15.0):
        timers.fire_due(now)
    assert fired == [5.0, 15.0]
    allow[0] = False
    timers.fire_due(25.0)
    timers.fire_due(26.0)
    assert timer.next_at == 25.0  # still due
    allow[0] = True
    timers.fire_due(27.0)
    assert fired == [5.0, 15.0, 27.0] and timers.next_due() == 37.0


def test_counters_count_every_attempt_once() -> None:
    counters = Counters()
    for _ in range(3):
        counters.on_result(TASK, failed(Reason.DISK_FULL))
    counters.on_result(TASK, Result(outcome=Outcome.SORTED, source="x", bytes=10))
    assert counters.outcomes[Outcome.FAILED] == 3
    assert counters.filed == 1 and counters.total == 4 and counters.bad == 3
    assert counters.bytes == 10


def test_log_sink_logs_a_repeated_failure_once(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink()
    with caplog.at_level(logging.INFO):
        sink.on_result(TASK, failed(Reason.DISK_FULL))
        sink.on_result(TASK, failed(Reason.DISK_FULL))
        sink.on_result(TASK, failed(Reason.READ_ONLY))
        sink.on_result(TASK, Result(outcome=Outcome.SORTED, source="x"))
        sink.on_result(TASK, failed(Reason.READ_ONLY))
    lines = [r.getMessage().split()[0] + " " + r.getMessage().split()[-1] for r in caplog.records]
    assert [line.split()[0] for line in lines] == ["failed", "failed", "sorted", "failed"]
