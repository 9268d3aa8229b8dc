"""The notify protocol against real AF_UNIX datagram sockets, as systemd would receive it.

A fake would only test our idea of the protocol; a bound socket shows exactly the bytes
that reach the service manager, one datagram per call.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomwatch.notify import Notifier


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def _pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting for more."""
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    path = tmp_path / "notify.sock"
    # sockaddr_un.sun_path holds 108 bytes; a very deep tmp_path would not fit.
    if len(os.fsencode(path)) >= 108:
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    return path


@pytest.fixture
def receiver(sock_path: Path) -> Iterator[socket.socket]:
    sock = _receiver(str(sock_path))
    yield sock
    sock.close()


@pytest.fixture
def notifier(sock_path: Path, receiver: socket.socket) -> Iterator[Notifier]:
    n = Notifier(str(sock_path))
    yield n
    n.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def test_ready_without_status(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.enabled
    notifier.ready()
    assert receiver.recv(65536) == b"READY=1"
    assert _pending(receiver) == []


def test_ready_with_status_is_one_datagram(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.ready("watching /srv/dicomwatch/inbox")
    assert receiver.recv(65536) == b"READY=1\nSTATUS=watching /srv/dicomwatch/inbox"
    assert _pending(receiver) == []


def test_each_message(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.status("filed 3, quarantined 1")
    notifier.watchdog()
    notifier.stopping()
    assert [receiver.recv(65536) for _ in range(3)] == [
        b"STATUS=filed 3, quarantined 1",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]
    assert _pending(receiver) == []


def test_reloading_carries_monotonic_usec(notifier: Notifier, receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv(65536).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_newlines_and_nul_cannot_inject_fields(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.status("bad\nREADY=1\r\nname\rwith\0nul")
    assert receiver.recv(65536) == b"STATUS=bad READY=1 name with nul"


def test_non_ascii_status_is_utf8(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.status("Müller ✓")
    assert receiver.recv(65536) == "STATUS=Müller ✓".encode()


def test_notify_socket_from_environment(
    sock_path: Path, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    n = Notifier()
    try:
        n.ready()
    finally:
        n.close()
    assert receiver.recv(65536) == b"READY=1"


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dicomwatch-test-{uuid.uuid4().hex}"
    receiver = _receiver(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    n = Notifier()
    try:
        n.ready("abstract")
        assert receiver.recv(65536) == b"READY=1\nSTATUS=abstract"
    finally:
        n.close()
        receiver.close()


def test_noop_when_unset(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier()
    assert not n.enabled
    with caplog.at_level(logging.DEBUG, logger="dicomwatch.notify"):
        n.ready("x")
        n.status("x")
        n.stopping()
        n.reloading()
        n.watchdog()
        n.close()
    assert caplog.records == []


def test_noop_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not Notifier().enabled


def test_unsupported_address_disables_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dicomwatch.notify"):
        n = Notifier("vsock:2:1234")
    assert not n.enabled
    n.ready()
    assert len(caplog.records) == 1


def test_missing_socket_does_not_raise_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "absent.sock"))
    assert n.enabled
    with caplog.at_level(logging.WARNING, logger="dicomwatch.notify"):
        n.ready("x")
        n.watchdog()
        n.stopping()
    n.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "absent.sock" in warnings[0].getMessage()


def test_too_long_path_does_not_raise(tmp_path: Path) -> None:
    n = Notifier("/" + "x" * 200)
    n.ready()
    n.close()


def test_carries_on_after_socket_comes_back(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _receiver(str(sock_path))
    n = Notifier(str(sock_path))
    n.watchdog()
    assert first.recv(65536) == b"WATCHDOG=1"
    first.close()
    sock_path.unlink()
    with caplog.at_level(logging.WARNING, logger="dicomwatch.notify"):
        n.watchdog()  # nobody listening: logged, not raised
    assert len(caplog.records) == 1
    second = _receiver(str(sock_path))
    try:
        n.watchdog()
        assert second.recv(65536) == b"WATCHDOG=1"
    finally:
        n.close()
        second.close()


def test_close_is_idempotent_and_reopens(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.close()
    notifier.close()
    notifier.status("after close")
    assert receiver.recv(65536) == b"STATUS=after close"


def test_forked_child_stays_silent(
    notifier: Notifier, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    notifier.status("from a worker")
    monkeypatch.undo()
    assert _pending(receiver) == []


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("60000000", "other", None),
        ("60000000", "not-a-pid", None),
        ("1000000", "", 0.5),
        ("0", None, None),
        ("-5", None, None),
        ("abc", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        pid = str(os.getpid())
    elif pid == "other":
        pid = str(os.getpid() + 1)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert Notifier().watchdog_interval() == expected
