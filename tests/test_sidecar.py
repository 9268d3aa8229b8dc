"""The quarantine record: one type that the sorter writes and every reader parses."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomwatch.config import Config
from dicomwatch.result import Outcome, render_json, render_text
from dicomwatch.sidecar import SIDECAR_SUFFIX, SIDECAR_VERSION, QuarantineRecord
from dicomwatch.sorter import Task, process
from dicomwatch.staging import Staging


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    cfg = Config(inbox=tmp_path / "inbox", archive=tmp_path / "archive", quarantine=tmp_path / "q")
    for folder in (cfg.inbox, cfg.archive, cfg.quarantine):
        folder.mkdir()
    return cfg


def test_what_the_sorter_writes_reads_back_as_the_same_record(cfg: Config) -> None:
    src = cfg.inbox / "junk \udcff.dcm"
    src.write_bytes(b"not dicom at all")
    with Staging(cfg, owner="t") as settings:
        result = process(Task(path=str(src), source=str(src), rel_source=src.name), settings)
    assert result.outcome is Outcome.QUARANTINED and result.destination
    sidecar = Path(result.destination + SIDECAR_SUFFIX)
    record = QuarantineRecord.from_bytes(sidecar.read_bytes())
    assert record.reason == "not_dicom" and record.outcome == "quarantined"
    assert record.source == str(src)  # a name that is not UTF-8 survives the round trip
    assert record.version == SIDECAR_VERSION and record.attempts == 0
    assert QuarantineRecord.from_bytes(record.to_bytes()) == record


def test_a_record_without_a_version_is_version_1() -> None:
    old = {"outcome": "quarantined", "reason": "truncated", "error": "x", "source": "a",
           "time": "2026-01-01T00:00:00+00:00", "sop_instance_uid": None, "node": "n",
           "attempts": 1}  # fmt: skip
    record = QuarantineRecord.from_bytes(json.dumps(old).encode())
    assert (record.version, record.reason, record.attempts) == (1, "truncated", 1)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"\xff\xfe", b'{"error": "no reason"}', b'{"reason": "x", "version": 99}'],
)
def test_anything_else_is_refused_clearly(data: bytes) -> None:
    with pytest.raises(ValueError, match="quarantine record"):
        QuarantineRecord.from_bytes(data)


def test_the_result_carries_identifiers_the_log_line_does_not_show(
    cfg: Config, make_dicom: Callable[..., Path]
) -> None:
    src = cfg.inbox / "a.dcm"
    shutil.copy(make_dicom(PatientID="MARKER^PID", SeriesNumber=7, InstanceNumber=3), src)
    with Staging(cfg, owner="t") as settings:
        result = process(Task(path=str(src), source=str(src)), settings)
    assert result.outcome is Outcome.SORTED and result.instance is not None
    ids = result.instance
    assert ids.patient_id == "MARKER^PID" and ids.modality == "CT"
    assert ids.series_instance_uid == "1.2.826.0.1.3680043.8.498.2"
    assert ids.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert (ids.series_number, ids.instance_number, ids.study_date) == ("7", "3", "20240101")
    assert ids.template_values["PatientID"] == "MARKER^PID"
    # (The destination shows the cleaned, lower-cased folder name; PHI-safe paths are
    # a separate setting.)
    assert "MARKER" not in render_json(result)
    assert "series_instance_uid" not in render_json(result)
    assert "MARKER" not in render_text(result)


def test_a_quarantine_name_is_never_hidden(cfg: Config) -> None:
    """Files the receiver wrote come from ``.dicomwatch-received/``: their quarantine copy
    must still show in a plain ``ls``."""
    folder = cfg.inbox / ".dicomwatch-received" / "CT1"
    folder.mkdir(parents=True)
    src = folder / "1.2.3.abc.dcm"
    src.write_bytes(b"not dicom at all")
    rel = ".dicomwatch-received/CT1/1.2.3.abc.dcm"
    with Staging(cfg, owner="t") as settings:
        result = process(Task(path=str(src), source=str(src), rel_source=rel), settings)
    assert result.outcome is Outcome.QUARANTINED and result.destination
    kept = Path(result.destination)
    assert kept.name == "dicomwatch-received_CT1_1.2.3.abc.dcm"
    assert kept.read_bytes() == b"not dicom at all"
