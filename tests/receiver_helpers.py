"""Run ``dicomwatch receive`` as a real subprocess and talk DICOM to it over loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from conftest import wait_for
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DCMTK_STORESCU = "/usr/bin/storescu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReceiverProc:
    """One receiver with the config file of a :class:`DaemonProc` (same inbox)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        config = yaml.safe_load(config_path.read_text())
        self.port = int(config["receiver"]["port"])
        self.inbox = Path(config["inbox"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomwatch", "receive", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
            )
        if wait:
            starts = self.starts
            assert wait_for(
                lambda: self.count_lines("receiving as ") >= starts or self.proc.poll() is not None,  # type: ignore[union-attr]
                30,
            ), self.text()
            assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count_lines(self, needle: str) -> int:
        return self.text().count(needle)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event is None or record.get("event") == event:
                out.append(record)
        return out

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def received_files(inbox: Path) -> list[Path]:
    root = inbox / ".dicomwatch-received"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def spool_files(inbox: Path) -> list[Path]:
    root = inbox / ".dicomwatch" / "receiving"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def make_ct(index: int, *, rows: int = 8, study: str | None = None) -> Dataset:
    """A small, valid CT instance with its own UIDs (native pixels, explicit VR LE)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"P{index % 7}"
    ds.PatientName = "Test^Receiver"
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.InstanceNumber = index
    ds.Rows = rows
    ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) + index).tobytes()
    return ds


def write_ct(path: Path, index: int, *, rows: int = 8) -> Dataset:
    ds = make_ct(index, rows=rows)
    ds.save_as(path, enforce_file_format=True)
    return ds
