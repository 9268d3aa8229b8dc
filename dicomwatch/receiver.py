"""``dicomwatch receive``: a DICOM Storage SCP that acknowledges only what is on disk.

Each C-STORE is received chunk by chunk into a temporary file in this process's own
folder ``inbox/.dicomwatch/receiving/<owner>/`` (never decoded, never held whole in
memory), fsync'ed, hard-linked to a new unique name in
``inbox/.dicomwatch-received/<calling AE>/`` (``os.link`` never replaces a file), and
the folder fsync'ed; only then does the sender get status 0x0000.  A write error on
the way (a full disk, EIO) answers 0xA700 (out of resources), anything unexpected
0xC210; neither leaves anything under a final name.
The watch daemon (``dicomwatch run``) files what appears there; the receiver writes
nothing else anywhere.

A receiver killed mid-transfer leaves only its temporary folder, which the next start
removes (the folder's ``flock`` tells a dead owner from a live one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dicomwatch.archive import abandoned_locks, fsync_dir
from dicomwatch.config import INTERNAL_DIR, Config
from dicomwatch.errors import ConfigError
from dicomwatch.notify import Notifier
from dicomwatch.received import ensure_received_root, make_private_dir, received_root
from dicomwatch.receiver_config import ReceiverConfig

log = logging.getLogger("dicomwatch.receive")

RECEIVING_DIR = "receiving"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STOP_WAIT_SECONDS = 30.0
VERIFICATION = "1.2.840.10008.1.1"
_BUFFER = 1 << 20
_UID_NAME = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_AE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_ae_folder(ae_title: str) -> str:
    """A folder name for a calling AE title: letters, digits, ``-``, ``_`` only."""
    name = _AE_UNSAFE.sub("_", ae_title.strip())
    return name or "_"


def safe_uid_name(uid: str) -> str:
    uid = uid.strip().rstrip("\0")
    return uid if len(uid) <= 64 and _UID_NAME.fullmatch(uid) else "instance"


def transfer_syntaxes(decompress: bool) -> list[str]:
    """Every syntax the sorter can read: uncompressed ones, and compressed ones with a
    decoder installed (all of them when ``decompress`` is off: files are kept as sent)."""
    from pydicom.pixels.decoders.base import get_decoder

    out: list[str] = []
    for uid in AllTransferSyntaxes:
        if not uid.is_compressed:
            out.append(str(uid))
            continue
        if not decompress:
            out.append(str(uid))
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(str(uid))
        except NotImplementedError:
            continue
    return out


# ----- the temporary file pynetdicom writes each incoming dataset into ------------------


class SpoolFile:
    """Stands in for the ``NamedTemporaryFile`` pynetdicom writes a dataset into.

    Created in the receiver's own temporary folder (same filesystem as the inbox, so the
    final ``os.link`` works), and it never raises from ``write``: an ``ENOSPC`` in the
    middle of a PDU would otherwise end the association thread with a traceback.  The
    error is kept, the file truncated to give the space back, and the C-STORE handler
    answers with a failure status once the message is complete.
    """

    def __init__(self, folder: Path) -> None:
        fd = -1
        try:
            fd, name = _mkstemp(folder)
            self.name = name
            self._fh = os.fdopen(fd, "wb", buffering=_BUFFER)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self.error: OSError | None = None
        self.size = 0
        self.owner: threading.Thread = threading.current_thread()
        self.file = self  # pynetdicom calls ``.file.flush()`` after every fragment

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._fh.write(data)
                self.size += len(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """A no-op: the buffer is written in large blocks, and fsync'ed at the end."""

    def finish(self, *, fsync: bool) -> None:
        """Everything on disk, or the error that stopped it."""
        if self.error is None:
            try:
                self._fh.flush()
                if fsync:
                    os.fsync(self._fh.fileno())
            except OSError as exc:
                self._fail(exc)
        if self.error is not None:
            raise self.error

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(OSError):
            os.ftruncate(self._fh.fileno(), 0)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            # the unwritten buffer is dropped: the file is removed right after this
            with contextlib.suppress(OSError):
                os.close(self._fh.fileno())


def _mkstemp(folder: Path) -> tuple[int, str]:
    for _ in range(100):
        name = str(folder / f"rx-{secrets.token_hex(8)}.part")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except FileExistsError:
            continue
        return fd, name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


class _Spools:
    """Open spool files by name, so the C-STORE handler finds the one for its request."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._open: dict[str, SpoolFile] = {}
        self._lock = threading.Lock()

    def new(self, *_args: Any, **_kwargs: Any) -> SpoolFile:
        assert self.folder is not None, "receiver not started"
        spool = SpoolFile(self.folder)
        spool.owner = threading.current_thread()  # the association's reading thread
        with self._lock:
            self._open[spool.name] = spool
        return spool

    def take(self, name: str) -> SpoolFile | None:
        with self._lock:
            return self._open.pop(name, None)

    def discard_dead(self) -> int:
        """Close and remove the spools of transfers cut off mid-dataset (an abort, a
        dropped connection): they never reach the handler, and pynetdicom leaves them."""
        with self._lock:
            dead = [s for s in self._open.values() if not s.owner.is_alive()]
            for spool in dead:
                del self._open[spool.name]
        for spool in dead:
            spool.close()
            with contextlib.suppress(OSError):
                os.unlink(spool.name)
        return len(dead)


SPOOLS = _Spools()


def install_spooling(folder: Path) -> None:
    """Make pynetdicom write every incoming dataset, chunk by chunk, into ``folder``."""
    SPOOLS.folder = folder
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(dimse_messages, "NamedTemporaryFile", SPOOLS.new)  # noqa: B010 - a module hook


class ReceivingFolder:
    """This process's temporary folder ``inbox/.dicomwatch/receiving/<owner>/``, locked
    for its lifetime; folders of receivers that died (lock free) are removed first."""

    def __init__(self, inbox: Path) -> None:
        self.base = inbox / INTERNAL_DIR / RECEIVING_DIR
        self.base.mkdir(parents=True, exist_ok=True)
        self.removed = 0
        for lock in abandoned_locks(self.base):
            folder = lock.with_suffix("")
            if folder.is_dir():
                self.removed += sum(1 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
        owner = f"{socket.gethostname() or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lock_path = self.base / f"{owner}.lock"
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.base / owner
        make_private_dir(self.path)

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)


# ----- associations ----------------------------------------------------------------------


@dataclass
class AssocStats:
    peer: str
    started: float = field(default_factory=time.monotonic)
    calling_ae: str = ""
    instances: int = 0
    failed: int = 0
    bytes: int = 0
    result: str = "closed"
    ended: float = 0.0


class _Server(ThreadedAssociationServer):
    """Refuses peers that are not allowed before a single PDU is read."""

    receiver: Receiver

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept with a timeout on every read and write of the connection.

        pynetdicom only times out a connection that is idle between PDUs; a peer that
        stops in the middle of one (or sends a header promising gigabytes) would hold
        its thread forever.  The TLS handshake is left to the association's own thread
        (its first read), so a slow handshake cannot hold up accepting others.
        """
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.settimeout(self.receiver.rc.network_timeout_seconds)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # each response is one small PDU: sent at once, not held back by Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        why = self.receiver.refuse_peer(host)
        if why is None:
            return True
        self.receiver.log_refused(f"{host}:{client_address[1]}", "", why)
        return False


class Receiver:
    """The Storage SCP, its folders and its association bookkeeping."""

    def __init__(self, cfg: Config, rc: ReceiverConfig) -> None:
        self.cfg = cfg
        self.rc = rc
        self.root = received_root(cfg.inbox)
        self._stats: dict[int, AssocStats] = {}
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self.server: _Server | None = None
        self.ae: AE | None = None
        self.receiving: ReceivingFolder | None = None
        self._closing: list[tuple[Any, AssocStats]] = []
        self._stopped = threading.Event()

    # -- policy ------------------------------------------------------------------------

    def refuse_peer(self, host: str) -> str | None:
        rc = self.rc
        if not rc.peer_allowed(host):
            if rc.allowed_peers:
                return "peer address not in allowed_peers"
            return "allowed_peers is empty: only loopback may connect"
        if not rc.allowed_calling_ae_titles and not ReceiverConfig().peer_allowed(host):
            return "allowed_calling_ae_titles is empty: only loopback may connect"
        return None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Prepare the folders and listen; returns the bound address."""
        self.cfg.inbox.mkdir(parents=True, exist_ok=True)
        self.root = ensure_received_root(self.cfg.inbox)
        self.receiving = ReceivingFolder(self.cfg.inbox)
        if self.receiving.removed:
            log.info(
                "removed %d partial instances left by a receiver that stopped",
                self.receiving.removed,
            )
        install_spooling(self.receiving.path)
        ssl_context = self._ssl_context()

        ae = AE(ae_title=self.rc.ae_title)
        syntaxes = transfer_syntaxes(self.cfg.decompress)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), syntaxes)
        ae.add_supported_context(VERIFICATION)
        ae.maximum_associations = self.rc.max_associations
        ae.maximum_pdu_size = self.rc.max_pdu
        ae.network_timeout = self.rc.network_timeout_seconds
        ae.acse_timeout = self.rc.network_timeout_seconds
        ae.dimse_timeout = self.rc.network_timeout_seconds
        if self.rc.allowed_calling_ae_titles:
            ae.require_calling_aet = list(self.rc.allowed_calling_ae_titles)
        self.ae = ae
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
        ]
        _Server.receiver = self
        try:
            server = ae.make_server(
                (self.rc.bind, self.rc.port),
                evt_handlers=handlers,
                ssl_context=ssl_context,
                server_class=_Server,
            )
        except OSError as exc:
            raise ConfigError(
                f"receiver: cannot listen on {self.rc.bind}:{self.rc.port}: {exc.strerror or exc}"
            ) from exc
        assert isinstance(server, _Server)
        self.server = server
        threading.Thread(
            target=server.serve_forever, name="dicomwatch-receive-accept", daemon=True
        ).start()
        threading.Thread(target=self._reaper, name="dicomwatch-receive-log", daemon=True).start()
        host, port = server.server_address[:2]
        log.info(
            "receiving as %s on %s:%d%s into %s (%d transfer syntaxes, up to %d associations)",
            self.rc.ae_title,
            host,
            port,
            " with TLS" if ssl_context else "",
            self.root,
            len(syntaxes),
            self.rc.max_associations,
        )
        return str(host), int(port)

    def stop(self, timeout: float = STOP_WAIT_SECONDS) -> None:
        """Stop accepting, give running associations ``timeout`` to end, then abort them."""
        if self.server is not None:
            # socketserver's own shutdown: pynetdicom's also unregisters the server from
            # the AE, where only start_server registers it
            socketserver.BaseServer.shutdown(self.server)
            self.server.server_close()
        if self.ae is not None:
            deadline = time.monotonic() + timeout
            while self.ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
            for assoc in self.ae.active_associations:
                assoc.abort()
        self._stopped.set()
        self.reap(wait=True)
        if self.receiving is not None:
            self.receiving.release()
            self.receiving = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        rc = self.rc
        if not rc.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(rc.tls_cert, rc.tls_key)
            if rc.tls_ca:
                context.load_verify_locations(rc.tls_ca)
                context.verify_mode = (
                    ssl.CERT_REQUIRED if rc.tls_require_client_cert else ssl.CERT_OPTIONAL
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"receiver: cannot load the TLS certificate or key: {exc}") from exc
        return context

    # -- logging -----------------------------------------------------------------------

    def log_refused(self, peer: str, calling_ae: str, why: str) -> None:
        log.warning(
            "refused association from %s%s: %s",
            peer,
            f" (calling AE {calling_ae})" if calling_ae else "",
            why,
            extra={
                "event": "association_refused",
                "fields": {"peer": peer, "calling_ae": calling_ae, "reason": why},
            },
        )

    def _stats_for(self, event: Any) -> AssocStats:
        key = id(event.assoc)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                addr = event.assoc.requestor.address
                port = event.assoc.requestor.port
                stats = self._stats[key] = AssocStats(peer=f"{addr}:{port}")
            return stats

    def _on_open(self, event: Any) -> None:
        host, port = event.address[:2]
        with self._lock:
            self._stats[id(event.assoc)] = AssocStats(peer=f"{host}:{port}")

    def _on_established(self, event: Any) -> None:
        self._stats_for(event).calling_ae = str(event.assoc.requestor.ae_title).strip()

    def _on_rejected(self, event: Any) -> None:
        stats = self._stats_for(event)
        title = str(event.assoc.requestor.ae_title).strip()
        host = stats.peer.rsplit(":", 1)[0]
        if not self.rc.calling_ae_allowed(title, host):
            why = "calling AE title not in allowed_calling_ae_titles"
        else:
            why = f"too many associations (max_associations {self.rc.max_associations})"
        stats.calling_ae = title
        stats.result = "refused"
        self.log_refused(stats.peer, title, why)

    def _on_close(self, event: Any) -> None:
        """The connection is gone; the line is written once the association has ended
        (pynetdicom reports the release or abort only after the connection closed)."""
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
            if stats is not None and stats.result != "refused":
                stats.ended = time.monotonic()
                self._closing.append((event.assoc, stats))

    def reap(self, *, wait: bool = False) -> None:
        """Write the line of every association whose thread has ended."""
        with self._lock:
            closing, self._closing = self._closing, []
        keep = []
        for assoc, stats in closing:
            if wait:
                assoc.join(5)
            if assoc.is_alive():
                keep.append((assoc, stats))
                continue
            if assoc.is_released:
                stats.result = "released"
            elif assoc.is_aborted:
                stats.result = "aborted"
            elif not stats.calling_ae:
                stats.result = "closed before association"
            self._log_association(stats)
        if keep:
            with self._lock:
                self._closing.extend(keep)
        if SPOOLS.discard_dead():
            log.debug("removed the temporary files of transfers that were cut off")

    def _reaper(self) -> None:
        while not self._stopped.wait(0.2):
            self.reap()

    def _log_association(self, stats: AssocStats) -> None:
        seconds = (stats.ended or time.monotonic()) - stats.started
        level = logging.INFO if stats.result == "released" and not stats.failed else logging.WARNING
        log.log(
            level,
            "association %s peer=%s calling_ae=%s instances=%d failed=%d bytes=%d seconds=%.2f",
            stats.result,
            stats.peer,
            stats.calling_ae or "-",
            stats.instances,
            stats.failed,
            stats.bytes,
            seconds,
            extra={
                "event": "association",
                "fields": {
                    "result": stats.result,
                    "peer": stats.peer,
                    "calling_ae": stats.calling_ae,
                    "instances": stats.instances,
                    "failed": stats.failed,
                    "bytes": stats.bytes,
                    "seconds": round(seconds, 3),
                },
            },
        )

    # -- services ----------------------------------------------------------------------

    def _on_echo(self, _event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        stats = self._stats_for(event)
        path = str(event.dataset_path)
        spool = SPOOLS.take(path)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            if spool is None:
                raise RuntimeError("no spool file for this request")
            spool.finish(fsync=self.cfg.fsync)
            final = self._publish(spool.name, stats.calling_ae, uid)
        except OSError as exc:
            stats.failed += 1
            log.error(
                "C-STORE of %s from %s failed: %s; answered 0x%04X",
                uid,
                stats.peer,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            return STATUS_OUT_OF_RESOURCES
        except Exception:
            stats.failed += 1
            log.exception("C-STORE of %s from %s failed", uid, stats.peer)
            return STATUS_CANNOT_UNDERSTAND
        stats.instances += 1
        stats.bytes += spool.size
        log.debug("received %s from %s as %s", uid, stats.peer, final)
        return STATUS_SUCCESS

    def _publish(self, tmp: str, calling_ae: str, uid: str) -> Path:
        """Link the complete temporary file to a new name; never replaces a file."""
        folder = self.root / safe_ae_folder(calling_ae)
        stem = safe_uid_name(uid)
        for _attempt in range(5):
            self._ensure_folder(folder)
            final = folder / f"{stem}.{secrets.token_hex(6)}.dcm"
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except FileNotFoundError:
                # our AE folder was tidied away as empty just now: make it again
                self._known_dirs.discard(str(folder))
                continue
            try:
                if self.cfg.fsync:
                    fsync_dir(folder)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(final)
                raise
            return final
        raise OSError(errno.EEXIST, "could not find a free name", str(folder))

    def _ensure_folder(self, folder: Path) -> None:
        if str(folder) in self._known_dirs and folder.is_dir():
            return
        if not self.root.is_dir():
            self.root = ensure_received_root(self.cfg.inbox)
        if make_private_dir(folder) and self.cfg.fsync:
            fsync_dir(self.root)
        with self._lock:
            if len(self._known_dirs) > 4096:
                self._known_dirs.clear()
            self._known_dirs.add(str(folder))


def run_receiver(cfg: Config, rc: ReceiverConfig) -> int:
    """The ``receive`` command: listen until SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    # pynetdicom logs every message at INFO; our own line per association says enough
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    receiver = Receiver(cfg, rc)
    try:
        receiver.start()
    except PermissionError as exc:
        raise ConfigError(f"receiver: {exc}") from exc
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    notifier = Notifier()
    notifier.ready(f"receiving on {rc.bind}:{rc.port}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        notifier.stopping()
        log.info("stopping: no new associations; waiting for running ones")
        receiver.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
        notifier.close()
    log.info("receiver stopped")
    return 0
