"""``dicomwatch receive`` over real loopback associations, with the real watch daemon.

Senders are pynetdicom (its ``storescu`` app and its API, in this process) and DCMTK's
``storescu``; the receiver and ``dicomwatch run`` are subprocesses sharing one config.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc, archived, archived_uids
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from receiver_helpers import (
    DCMTK_STORESCU,
    ReceiverProc,
    free_port,
    make_ct,
    received_files,
    spool_files,
    write_ct,
)

SETTLE = 30.0
"""Far longer than any test waits: a received file filed quickly was not settled."""


class Pair:
    """A watch daemon and a receiver on the same inbox and config file."""

    def __init__(self, root: Path, receiver: dict[str, Any] | None = None, **daemon: Any) -> None:
        self.port = free_port()
        settings = {"port": self.port, "network_timeout_seconds": 5, **(receiver or {})}
        daemon.setdefault("settle_seconds", SETTLE)
        self.daemon = DaemonProc(root, "a", receiver=settings, **daemon)
        self.inbox = self.daemon.inbox
        self.archive = self.daemon.archive
        self.receiver = ReceiverProc(self.daemon.config_path, root / "receiver.log")

    def stop(self) -> None:
        self.receiver.ensure_stopped()
        self.daemon.ensure_stopped()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(**kwargs: Any) -> Pair:
        p = Pair(tmp_path, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def scu(ae_title: str = "SENDER") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def send(port: int, datasets: list[Any], ae_title: str = "SENDER") -> list[int]:
    """C-STORE each dataset over one association; the statuses (-1: no response)."""
    assoc = scu(ae_title).associate("127.0.0.1", port)
    assert assoc.is_established, "association not accepted"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def echo_ok(port: int) -> bool:
    assoc = scu().associate("127.0.0.1", port)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()


def closed(assoc: Any) -> Any:
    """pynetdicom leaves the socket of a rejected or aborted association open."""
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.close()
    return assoc


def uid_of(path: str | Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ----- end to end ------------------------------------------------------------------------


def test_real_senders_in_their_own_transfer_syntax(pair: Callable[..., Pair]) -> None:
    """pynetdicom's and DCMTK's storescu send bundled files as they are encoded; each
    is acknowledged, filed once, and never waited on for settle_seconds."""
    if not Path(DCMTK_STORESCU).exists():
        pytest.skip("DCMTK storescu is not installed")
    p = pair()
    p.receiver.start()
    sent: list[str] = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        out = subprocess.run(
            [sys.executable, "-m", "pynetdicom", "storescu", "-v", "-aet", "PYSCU", "127.0.0.1",
             str(p.port), path],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0 and "0x0000" in out.stderr + out.stdout, out.stderr
        sent.append(uid_of(path))
    for name, option in (("JPEG2000.dcm", "-xw"), ("SC_rgb_rle.dcm", "-xr"), ("rtplan.dcm", "-xe")):
        path = get_testdata_file(name)
        assert path is not None
        out = subprocess.run(
            [DCMTK_STORESCU, option, "-aet", "DCMTK", "127.0.0.1", str(p.port), path],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        sent.append(uid_of(path))
    distinct = sorted(sent)
    assert len(set(distinct)) == len(sent)
    # stored exactly as sent (JPEG 2000 and RLE stay compressed until run decodes them)
    syntaxes = {str(dcmread(f).file_meta.TransferSyntaxUID) for f in received_files(p.inbox)}
    assert {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"} < syntaxes
    assert sorted(uid_of(f) for f in received_files(p.inbox)) == distinct
    p.daemon.start()
    assert wait_for(lambda: len(p.daemon.files()) == len(sent), 20), p.daemon.log_path.read_text()
    outcomes = sorted(r["outcome"] for r in p.daemon.files())
    assert outcomes == ["sorted"] * len(sent)
    assert archived_uids(p.archive) == distinct
    assert received_files(p.inbox) == []
    lines = p.receiver.records("association")
    assert len(lines) == 5 and {r["result"] for r in lines} == {"released"}
    assert {r["calling_ae"] for r in lines} == {"PYSCU", "DCMTK"}
    assert all(r["instances"] == 1 and r["bytes"] > 0 for r in lines)


def _concurrent(p: Pair, total: int, senders: int) -> None:
    per = [[make_ct(i) for i in range(k, total, senders)] for k in range(senders)]
    results: list[list[int]] = [[] for _ in range(senders)]

    def run(k: int) -> None:
        results[k] = send(p.port, per[k], ae_title=f"S{k}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [s for r in results for s in r] == [0] * total
    uids = sorted(str(ds.SOPInstanceUID) for batch in per for ds in batch)
    assert wait_for(lambda: len(p.daemon.files()) >= total, 300), p.daemon.log_path.read_text()
    assert {r["outcome"] for r in p.daemon.files()} == {"sorted"}
    assert archived_uids(p.archive) == uids


def test_200_instances_over_4_concurrent_associations(pair: Callable[..., Pair]) -> None:
    p = pair()
    p.receiver.start()
    p.daemon.start()
    _concurrent(p, 200, 4)


@pytest.mark.soak
def test_1000_instances_over_4_concurrent_associations(pair: Callable[..., Pair]) -> None:
    p = pair()
    p.receiver.start()
    p.daemon.start()
    _concurrent(p, 1000, 4)


def test_same_instance_twice_is_one_archive_file_and_a_duplicate(
    pair: Callable[..., Pair],
) -> None:
    p = pair()
    p.receiver.start()
    p.daemon.start()
    ds = make_ct(1)
    assert send(p.port, [ds]) == [0]
    assert send(p.port, [ds]) == [0]
    assert wait_for(lambda: len(p.daemon.files()) == 2, 20)
    assert sorted(r["outcome"] for r in p.daemon.files()) == ["duplicate", "sorted"]
    assert archived_uids(p.archive) == [str(ds.SOPInstanceUID)]


# ----- who may connect -------------------------------------------------------------------


def test_calling_ae_not_allowed_is_rejected_and_nothing_written(
    pair: Callable[..., Pair],
) -> None:
    p = pair(receiver={"allowed_calling_ae_titles": ["GOOD"]})
    p.receiver.start()
    assoc = closed(scu("BAD").associate("127.0.0.1", p.port))
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (1, 3)
    assert send(p.port, [make_ct(1)], ae_title="GOOD") == [0]
    assert wait_for(lambda: len(p.receiver.records("association_refused")) == 1, 10)
    refused = p.receiver.records("association_refused")
    assert refused[0]["calling_ae"] == "BAD"
    assert "allowed_calling_ae_titles" in refused[0]["reason"]
    assert [f.parent.name for f in received_files(p.inbox)] == ["GOOD"]


def test_peer_not_allowed_is_refused_before_any_pdu(pair: Callable[..., Pair]) -> None:
    p = pair(receiver={"allowed_peers": ["192.0.2.0/24"], "allowed_calling_ae_titles": ["S"]})
    p.receiver.start()
    assoc = closed(scu("S").associate("127.0.0.1", p.port))
    assert not assoc.is_established
    assert wait_for(lambda: len(p.receiver.records("association_refused")) == 1, 10)
    assert p.receiver.records("association_refused")[0]["reason"] == (
        "peer address not in allowed_peers"
    )
    assert received_files(p.inbox) == []


def test_more_associations_than_allowed_are_refused_others_unaffected(
    pair: Callable[..., Pair],
) -> None:
    p = pair(receiver={"max_associations": 2})
    p.receiver.start()
    held = [scu(f"H{k}").associate("127.0.0.1", p.port) for k in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = closed(scu("EXTRA").associate("127.0.0.1", p.port))
        assert extra.is_rejected
        assert (extra.acceptor.primitive.result, extra.acceptor.primitive.diagnostic) == (2, 2)
        for k, assoc in enumerate(held):
            status = assoc.send_c_store(make_ct(k))
            assert int(status.Status) == 0
    finally:
        for assoc in held:
            assoc.release()
    assert wait_for(lambda: len(p.receiver.records("association_refused")) == 1, 10)
    assert "too many associations" in p.receiver.records("association_refused")[0]["reason"]
    assert len(received_files(p.inbox)) == 2
    assert send(p.port, [make_ct(9)]) == [0]


# ----- failures --------------------------------------------------------------------------


def _slow_sender(
    port: int, ds: Any, pause: float, done: list[Any], assocs: list[Any] | None = None
) -> None:
    """Send one instance, pausing after every PDU, as a slow WAN link would."""
    ae = scu("SLOW")
    assoc = ae.associate("127.0.0.1", port)
    if assocs is not None:
        assocs.append(assoc)
    if not assoc.is_established:
        done.append("not established")
        closed(assoc)
        return
    sock = assoc.dul.socket
    assert sock is not None
    original = sock.send

    def slow(data: bytes) -> None:
        time.sleep(pause)
        original(data)

    sock.send = slow  # type: ignore[method-assign]
    try:
        done.append(assoc.send_c_store(ds))
    except Exception as exc:
        done.append(exc)
    finally:
        if assoc.is_established:
            assoc.abort()
        closed(assoc)


def test_kill_9_mid_transfer_leaves_nothing_final_and_is_cleaned_at_start(
    pair: Callable[..., Pair],
) -> None:
    p = pair()
    p.receiver.start()
    big = make_ct(1, rows=1024)  # 2 MiB of pixels: ~130 PDUs of 16 kB
    done: list[Any] = []
    sender = threading.Thread(target=_slow_sender, args=(p.port, big, 0.02, done))
    sender.start()
    try:
        assert wait_for(
            lambda: any(f.stat().st_size > 100_000 for f in spool_files(p.inbox)), 20
        ), "the transfer never started"
        p.receiver.kill()
    finally:
        sender.join(30)
    partial = spool_files(p.inbox)
    assert len(partial) == 1, partial
    assert received_files(p.inbox) == []
    p.receiver.start()
    assert wait_for(lambda: p.receiver.count_lines("removed 1 partial instances") == 1, 10)
    assert spool_files(p.inbox) == []
    assert not partial[0].parent.exists()
    assert send(p.port, [big]) == [0]
    [final] = received_files(p.inbox)
    assert final.stat().st_size > 2 * 1024 * 1024
    assert uid_of(final) == str(big.SOPInstanceUID)


def test_stalled_and_garbage_senders_are_dropped_others_still_served(
    pair: Callable[..., Pair],
) -> None:
    p = pair(receiver={"network_timeout_seconds": 1.5})
    p.receiver.start()
    stalled = socket.create_connection(("127.0.0.1", p.port))
    garbage = socket.create_connection(("127.0.0.1", p.port))
    try:
        # an A-ASSOCIATE-RQ header that promises 1000 bytes, then 10 of them, then silence
        stalled.sendall(b"\x01\x00" + (1000).to_bytes(4, "big") + b"\x00\x01" + b"\x00" * 8)
        garbage.sendall(os.urandom(4096))
        started = time.monotonic()
        assert send(p.port, [make_ct(1)]) == [0], "another sender was held up"
        stalled.settimeout(20)
        garbage.settimeout(20)
        assert _drained(garbage), "garbage connection not closed"
        assert _drained(stalled), "stalled connection not closed"
        elapsed = time.monotonic() - started
        assert 1.0 < elapsed < 15, elapsed
    finally:
        stalled.close()
        garbage.close()
    assert send(p.port, [make_ct(2)]) == [0]
    assert len(received_files(p.inbox)) == 2
    assert p.receiver.proc is not None and p.receiver.proc.poll() is None


def _drained(sock: socket.socket) -> bool:
    """True once the peer closed the connection (EOF or reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_untrusted_received_folder_is_refused(pair: Callable[..., Pair]) -> None:
    """A received folder a sender could write to must not skip settling: the receiver
    refuses to start, and the daemon leaves files there alone."""
    p = pair()
    folder = p.inbox / ".dicomwatch-received"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    p.receiver.start(wait=False)
    assert p.receiver.proc is not None
    assert p.receiver.proc.wait(30) == 78
    assert "cannot be trusted" in p.receiver.text()
    (folder / "X").mkdir()
    write_ct(folder / "X" / "forged.dcm", 1)
    p.daemon.start()
    assert wait_for(lambda: p.daemon.count_lines("not taking files from") >= 1, 10)
    time.sleep(1)
    assert archived(p.archive) == []


# ----- a full disk -----------------------------------------------------------------------


@pytest.fixture
def small_inbox(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(inbox)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.skip(f"mount is not allowed here: {out.stderr.strip()}")
    try:
        yield inbox
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False)


@pytest.mark.root
def test_disk_full_mid_association_fails_those_instances_only(
    pair: Callable[..., Pair], small_inbox: Path
) -> None:
    p = pair(inbox=small_inbox)
    p.receiver.start()
    instances = [make_ct(i, rows=256) for i in range(24)]  # 128 kB each: 3 MB > 2 MB
    statuses = send(p.port, instances)
    assert 0 in statuses
    assert set(statuses) <= {0, 0xA700}, statuses
    assert 0xA700 in statuses
    stored = received_files(small_inbox)
    assert len(stored) == statuses.count(0)
    for path in stored:  # every file under a final name is complete
        assert dcmread(path).PixelData == next(
            ds.PixelData for ds in instances if str(ds.SOPInstanceUID) == uid_of(path)
        )
    assert spool_files(small_inbox) == []
    assert echo_ok(p.port), "the receiver stopped serving"
    assert p.receiver.count_lines("failed: No space left on device") >= 1
    for path in stored:
        path.unlink()
    assert send(p.port, [instances[-1]]) == [0]


# ----- TLS -------------------------------------------------------------------------------


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_with_client_certificates(pair: Callable[..., Pair], tmp_path: Path) -> None:
    import ssl

    server_cert, server_key = _certificate(tmp_path, "server")
    client_cert, client_key = _certificate(tmp_path, "client")
    p = pair(
        receiver={
            "tls_cert": str(server_cert),
            "tls_key": str(server_key),
            "tls_ca": str(client_cert),
            "tls_require_client_cert": True,
        }
    )
    p.receiver.start()
    assert "with TLS" in p.receiver.text()

    def context(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
        if with_cert:
            ctx.load_cert_chain(str(client_cert), str(client_key))
        return ctx

    ds = make_ct(1)
    assoc = scu().associate("127.0.0.1", p.port, tls_args=(context(True), "localhost"))
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    # no client certificate, or no TLS at all: no association, nothing written
    for attempt in (
        lambda: scu().associate("127.0.0.1", p.port, tls_args=(context(False), "localhost")),
        lambda: scu().associate("127.0.0.1", p.port),
    ):
        refused = closed(attempt())
        assert not refused.is_established
    [stored] = received_files(p.inbox)
    assert uid_of(stored) == str(ds.SOPInstanceUID)
    assert echo_ok_tls(p.port, context(True))


def echo_ok_tls(port: int, ctx: Any) -> bool:
    assoc = scu().associate("127.0.0.1", port, tls_args=(ctx, "localhost"))
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_sigterm_lets_a_running_transfer_finish(pair: Callable[..., Pair]) -> None:
    p = pair()
    p.receiver.start()
    big = make_ct(1, rows=1024)
    done: list[Any] = []
    sender = threading.Thread(target=_slow_sender, args=(p.port, big, 0.01, done))
    sender.start()
    try:
        assert wait_for(lambda: any(f.stat().st_size > 0 for f in spool_files(p.inbox)), 20)
        assert p.receiver.proc is not None
        p.receiver.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: p.receiver.count_lines("stopping: no new associations") == 1, 10)
        assert wait_for(lambda: not _connects(p.port), 10), "still accepting"
    finally:
        sender.join(60)
    assert p.receiver.proc.wait(60) == 0
    assert len(done) == 1 and int(done[0].Status) == 0, done
    [stored] = received_files(p.inbox)
    assert uid_of(stored) == str(big.SOPInstanceUID)
    assert spool_files(p.inbox) == []


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_daemon_started_before_the_receiver_watches_the_folder_once_it_appears(
    pair: Callable[..., Pair],
) -> None:
    """The received folder does not exist when the daemon starts: it is watched as soon
    as the receiver makes it, and what arrives is still filed without settling."""
    p = pair()
    p.daemon.start()
    assert not (p.inbox / ".dicomwatch-received").exists()
    p.receiver.start()
    ds = make_ct(1)
    started = time.monotonic()
    assert send(p.port, [ds]) == [0]
    assert wait_for(lambda: len(p.daemon.files()) == 1, 20), p.daemon.log_path.read_text()
    assert time.monotonic() - started < SETTLE / 2
    assert archived_uids(p.archive) == [str(ds.SOPInstanceUID)]


def test_an_instance_run_cannot_file_is_quarantined_like_any_other(
    pair: Callable[..., Pair],
) -> None:
    """The receiver does not decode: pixel data shorter than the image is acknowledged
    (it is on disk as sent), and the daemon quarantines it with the reason."""
    p = pair()
    p.receiver.start()
    p.daemon.start()
    ds = make_ct(1, rows=64)
    ds.PixelData = ds.PixelData[:100]
    assert send(p.port, [ds]) == [0]
    assert wait_for(lambda: len(p.daemon.files()) == 1, 20)
    [record] = p.daemon.files()
    assert record["outcome"] == "quarantined"
    [kept] = list(p.daemon.quarantine.glob("*/*SENDER*.dcm"))
    assert kept.parent.name == "truncated"
    assert kept.with_name(kept.name + ".reason.json").exists()
    assert archived(p.archive) == []


def test_a_connection_dropped_mid_transfer_leaves_no_temporary_file(
    pair: Callable[..., Pair],
) -> None:
    p = pair()
    p.receiver.start()
    assert p.receiver.proc is not None
    fds = Path(f"/proc/{p.receiver.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    done: list[Any] = []
    assocs: list[Any] = []
    big = make_ct(1, rows=1024)
    sender = threading.Thread(target=_slow_sender, args=(p.port, big, 0.02, done, assocs))
    sender.start()
    try:
        assert wait_for(lambda: any(f.stat().st_size > 100_000 for f in spool_files(p.inbox)), 20)
        assocs[0].dul.socket.socket.shutdown(socket.SHUT_RDWR)
    finally:
        sender.join(30)
    assert wait_for(lambda: spool_files(p.inbox) == [], 10), spool_files(p.inbox)
    assert wait_for(lambda: len(list(fds.iterdir())) <= before, 10), "a file was left open"
    assert received_files(p.inbox) == []
    assert wait_for(lambda: len(p.receiver.records("association")) == 1, 10)
    assert p.receiver.records("association")[0]["result"] == "aborted"
    assert send(p.port, [big]) == [0]
