"""Network receiving, end to end: DCMTK ``storescu`` -> receiver -> ``dicomwatch run`` -> archive.

Two receivers on the same corpus, in one run, each with a fresh inbox and archive and
the same ``dicomwatch run`` settings (default ``settle_seconds: 2``, default workers):

* ``dicomwatch receive``: instances are fsync'ed and linked into
  ``inbox/.dicomwatch-received/``, and the daemon files them without settling;
* DCMTK ``storescp`` writing into the inbox (``-od inbox``): the daemon sees ordinary
  files and settles each for ``settle_seconds``.

For each, ``storescu`` sends the whole corpus folder over ``--associations`` parallel
associations (the corpus split evenly, one ``storescu`` process each), and the clock
runs from the first ``storescu`` start until the daemon's log has one ``file`` record per
instance. Figures: end-to-end instances/s, the send time alone (until every
``storescu`` exited), and the daemon's steady filing rate between its first and last
record. The corpus is generated (uncompressed CT, ``--rows`` square, 16-bit) and
cached in ``bench/out/receive-corpus-<n>-<rows>/``.

    python bench/receive_bench.py --files 1000 --rows 256 --associations 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def corpus(n: int, rows: int) -> Path:
    folder = OUT / f"receive-corpus-{n}-{rows}"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    study = generate_uid()
    series = [generate_uid() for _ in range(max(1, n // 100))]
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series[i % len(series)]
        ds.PatientID = "BENCH"
        ds.StudyDate = "20240101"
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, rows * rows, dtype=np.uint16).tobytes()
        ds.save_as(folder / f"IM{i:06d}.dcm", enforce_file_format=True)
    done.touch()
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def file_records(log: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "file":
            out.append(rec)
    return out


def wait_line(log: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{needle!r} not in {log} after {timeout} s")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def one_run(kind: str, files: list[Path], work: Path, associations: int) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    inbox = work / "inbox"
    inbox.mkdir()
    config = {
        "inbox": str(inbox),
        "archive": str(work / "archive"),
        "quarantine": str(work / "quarantine"),
        "log_format": "json",
        "receiver": {"port": port, "max_associations": max(10, associations)},
    }
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    daemon_log = work / "run.log"
    scp_log = work / "scp.log"
    dw = [sys.executable, "-m", "dicomwatch"]
    with daemon_log.open("wb") as fh:
        daemon = subprocess.Popen([*dw, "run", "--config", str(config_path)], stdout=fh, stderr=fh)
    if kind == "dicomwatch receive":
        scp_cmd = [*dw, "receive", "--config", str(config_path)]
    else:
        scp_cmd = [STORESCP, "-od", str(inbox), "-aet", "DICOMWATCH", str(port)]
    with scp_log.open("wb") as fh:
        scp = subprocess.Popen(
            scp_cmd, stdout=fh, stderr=fh, env={**os.environ, "TCP_NODELAY": "1"}
        )
    try:
        wait_line(daemon_log, "with the ", 60)
        wait_port(port, 60)
        time.sleep(0.5)
        shares = [files[k::associations] for k in range(associations)]
        start = time.time()
        t0 = time.monotonic()
        senders = []
        # DCMTK leaves Nagle on unless told (40 ms per round trip with delayed ACKs)
        env = {**os.environ, "TCP_NODELAY": "1"}
        for k, share in enumerate(shares):
            command = [STORESCU, "-aet", f"BENCH{k}", "-aec", "DICOMWATCH", "127.0.0.1"]
            command += [str(port), *map(str, share)]
            senders.append(
                subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
                )
            )
        for s in senders:
            _, err = s.communicate(timeout=3600)
            if s.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
        sent = time.monotonic() - t0
        deadline = time.monotonic() + 3600
        while len(file_records(daemon_log)) < len(files):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"daemon filed {len(file_records(daemon_log))}/{len(files)}")
            time.sleep(0.05)
        total = time.monotonic() - t0
    finally:
        for proc in (scp, daemon):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (scp, daemon):
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    records = file_records(daemon_log)
    times = sorted(datetime.fromisoformat(r["time"]).timestamp() for r in records)
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {
        "receiver": kind,
        "instances": len(files),
        "seconds_end_to_end": round(total, 2),
        "instances_per_s_end_to_end": round(len(files) / total, 1),
        "seconds_sending": round(sent, 2),
        "first_filed_after_s": round(times[0] - start, 2),
        "daemon_steady_instances_per_s": round(steady, 1),
        "outcomes": outcomes,
        "load_1min": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    folder = corpus(args.files, args.rows)
    files = sorted(folder.glob("IM*.dcm"))
    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} instances, {size / 1e6:.1f} MB, in {folder}", flush=True)
    results = []
    for _round in range(args.repeat):
        for kind in ("dicomwatch receive", "DCMTK storescp"):
            result = one_run(kind, files, OUT / "work-receive", args.associations)
            results.append(result)
            print(json.dumps(result), flush=True)
    (OUT / "results-receive.json").write_text(json.dumps(results, indent=2))
    print()
    print("| receiver | instances/s end to end | seconds | sending s | first filed after s "
          "| daemon steady /s | load |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in results:
        print(
            f"| {r['receiver']} | {r['instances_per_s_end_to_end']} | {r['seconds_end_to_end']} "
            f"| {r['seconds_sending']} | {r['first_filed_after_s']} "
            f"| {r['daemon_steady_instances_per_s']} | {r['load_1min']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
