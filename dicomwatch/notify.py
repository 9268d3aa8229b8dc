"""Tell systemd how the daemon is doing: the ``sd_notify`` protocol, written out by hand.

The unit runs with ``Type=notify``: systemd considers the service started only when the
daemon says ``READY=1``, shows whatever it last sent as ``STATUS=`` in ``systemctl
status``, restarts it when the ``WATCHDOG=1`` heartbeats stop (``WatchdogSec=``), and
knows a stop or a reload is in progress from ``STOPPING=1`` / ``RELOADING=1``.

Why not a library: the PyPI ``sdnotify`` package has been unmaintained since 2017, and
``systemd-python`` needs the libsystemd headers and a C compiler at install time, which
a plain ``pip install`` into a server's venv should not require.  The protocol itself
is a single ``sendto``: one datagram of newline-separated ``KEY=VALUE`` lines on an
``AF_UNIX`` ``SOCK_DGRAM`` socket whose address systemd puts in ``$NOTIFY_SOCKET`` (an
``@`` prefix means the Linux abstract namespace, i.e. a leading NUL byte).  See
``sd_notify(3)``.

Why sending never raises: the notifications are a courtesy to the service manager, not
part of filing a file.  A vanished or refusing socket (systemd re-executing, the daemon
started by hand with a stale variable) must not take the daemon down, so failures are
logged as a warning once and the caller carries on.  Outside systemd (``NOTIFY_SOCKET``
unset) every method is a no-op, so the code calling it needs no ``if``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

# A blocked send must not stall the work loop that also feeds the watchdog: a datagram
# to a receiver whose queue is full would otherwise block indefinitely.
_SEND_TIMEOUT_S = 1.0


def _parse_address(value: str) -> bytes | None:
    """Turn a ``$NOTIFY_SOCKET`` value into a ``sockaddr_un`` path, or ``None``.

    Only the two forms systemd 252 uses are supported: an absolute file-system path and
    ``@name`` for the abstract namespace.  Anything else (a relative path, the
    ``vsock:`` form newer systemd offers to VMs) cannot be a local socket we can reach.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def _clean(value: str) -> str:
    """Make ``value`` safe as one protocol field.

    A newline would start a new ``KEY=VALUE`` line (a file name in a status text could
    inject ``READY=1``), and systemd drops a whole message containing a NUL byte.
    """
    return value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\0", " ")


class Notifier:
    """Sends ``sd_notify`` messages to the service manager; a no-op outside systemd.

    Safe to call from several threads (a heartbeat thread and the work loop).  Only the
    process that created the notifier sends: a forked worker inheriting it stays silent,
    because with ``NotifyAccess=main`` systemd would drop and complain about its
    messages anyway.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        """Use ``socket_path``, or ``$NOTIFY_SOCKET`` when not given.

        An empty or unset address disables the notifier; an unusable one disables it
        with a warning.
        """
        if socket_path is None:
            socket_path = os.environ.get("NOTIFY_SOCKET")
        self._address: bytes | None = None
        self._display = socket_path or ""
        if socket_path:
            self._address = _parse_address(socket_path)
            if self._address is None:
                log.warning("ignoring unsupported NOTIFY_SOCKET address %r", socket_path)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._owner_pid = os.getpid()

    @property
    def enabled(self) -> bool:
        """Whether messages are actually sent (a usable notify socket address is known)."""
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        """Report start-up (or a reload) as complete, optionally with a status line.

        systemd holds ``systemctl start`` until this arrives, so send it only once the
        inbox is being watched.
        """
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status
        self._send(fields)

    def status(self, text: str) -> None:
        """Set the free-form line ``systemctl status`` shows (e.g. running counts)."""
        self._send({"STATUS": text})

    def stopping(self) -> None:
        """Report that shutdown has begun, so systemd shows "deactivating" meanwhile."""
        self._send({"STOPPING": "1"})

    def reloading(self) -> None:
        """Report that a configuration reload has begun; follow it with :meth:`ready`.

        ``MONOTONIC_USEC`` (the ``CLOCK_MONOTONIC`` time in microseconds) is required by
        systemd >= 253 for ``Type=notify-reload``, so it can tell this reload from an
        earlier one; older versions ignore the field.
        """
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send({"RELOADING": "1", "MONOTONIC_USEC": str(now_us)})

    def watchdog(self) -> None:
        """Send one heartbeat; with ``WatchdogSec=`` systemd kills a daemon that stops."""
        self._send({"WATCHDOG": "1"})

    def watchdog_interval(self) -> float | None:
        """Seconds between heartbeats, or ``None`` when no watchdog is expected of us.

        Half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends, so one
        late beat is not yet fatal.  ``$WATCHDOG_PID``, when set, names the process the
        watchdog applies to; in any other process (a worker that inherited the
        environment) there is nothing to send.
        """
        pid_text = os.environ.get("WATCHDOG_PID")
        if pid_text:
            try:
                pid = int(pid_text)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        usec_text = os.environ.get("WATCHDOG_USEC")
        if not usec_text:
            return None
        try:
            usec = int(usec_text)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Release the socket; later messages open a new one.  Safe to call twice."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, fields: dict[str, str]) -> None:
        """Send ``fields`` as one datagram; never raises (see the module docstring)."""
        if self._address is None or os.getpid() != self._owner_pid:
            return
        payload = "\n".join(f"{key}={_clean(value)}" for key, value in fields.items())
        data = payload.encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(_SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "cannot notify the service manager at %r (%s); carrying on",
                        self._display,
                        exc,
                    )
                else:
                    log.debug("notify failed again: %s", exc)
