"""The command line itself: help texts, option values, levels and overrides, run as the
real command (``python -m dicomwatch``) against real folders."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

UID = "1.2.826.0.1.3680043.8.498.99.1"


def dicomwatch(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomwatch", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )


@pytest.fixture
def src(tmp_path: Path, make_dicom: Callable[..., Path]) -> Path:
    """One good instance and one text file."""
    folder = tmp_path / "src"
    make_dicom("good.dcm", folder=folder, SOPInstanceUID=UID, PatientID="P1")
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder


# ----- start-up lines ---------------------------------------------------------------------


def test_codecs_are_one_short_line_at_start(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", src, cwd=tmp_path)
    codec_lines = [line for line in out.stderr.splitlines() if "transfer syntax" in line]
    assert len(codec_lines) == 1, codec_lines
    line = codec_lines[0]
    assert len(line) < 300, line
    for name in ("JPEG-LS", "JPEG 2000", "RLE"):
        assert name in line
    assert "1.2.840.10008" not in line  # the UIDs are for -v
