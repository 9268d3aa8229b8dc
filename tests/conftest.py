"""Shared fixtures: real DICOM files (pydicom's vendor test data and ones we make)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import examples
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def vendor_file(name: str) -> Path:
    """A file from pydicom's bundled test data, or skip the test if this pydicom lacks it."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(path))


def build_dataset(
    *, rows: int = 8, columns: int = 8, frames: int = 1, seed: int = 0, **tags: Any
) -> Dataset:
    """A small, valid CT instance with native 16-bit pixels; ``tags`` override anything."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    uid = tags.get("SOPInstanceUID") or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.PatientID = "PID001"
    ds.PatientName = "Test^Patient"
    ds.StudyDate = "20240101"
    ds.StudyDescription = "CT Head"
    ds.SeriesDescription = "Axial 5mm"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.InstanceNumber = 1
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=rows * columns * frames, dtype="<u2").tobytes()
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.fixture
def make_dicom(tmp_path: Path) -> Callable[..., Path]:
    """``make_dicom(name, **tags)`` writes a small valid instance and returns its path."""
    counter = iter(range(1_000_000))

    def make(name: str | None = None, *, folder: Path | None = None, **tags: Any) -> Path:
        ds = build_dataset(seed=next(counter), **tags)
        target = (folder or tmp_path / "made") / (name or f"file{next(counter):05d}.dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        return target

    return make


@pytest.fixture
def ct_small() -> Path:
    return Path(str(examples.get_path("ct")))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test stops the threads it starts (observers, scanners)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {[t.name for t in extra]}")


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; True if it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
