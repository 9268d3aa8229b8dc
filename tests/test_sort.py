"""``dicomwatch sort`` end to end: real vendor files, real worker processes, real folders."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import build_dataset, vendor_file
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomwatch.cli import main

LOSSLESS = [
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle_2frame.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
    "CT_small.dcm",
]
LOSSY = [
    "JPEG2000.dcm",
    "JPEGLSNearLossless_16.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_jpeg_no_color_transform.dcm",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default quarantine is ./quarantine: keep it in the test's own folder."""
    monkeypatch.chdir(tmp_path)


def sort(*args: str | Path) -> int:
    return main(["sort", "--no-progress", *map(str, args)])


def archived(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".dicomwatch" not in p.parts)


def only_file(root: Path) -> Path:
    files = archived(root)
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_sources_keep_pixels_and_uid(name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(vendor_file(name), src / "in")
    original = dcmread(vendor_file(name))
    assert sort(src, "--archive", tmp_path / "archive") == 0
    out = dcmread(only_file(tmp_path / "archive"))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(out.pixel_array, original.pixel_array)
    assert (src / "in").exists(), "copy mode keeps the source"


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_sources_decode_and_say_so(name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(vendor_file(name), src / "in")
    original = dcmread(vendor_file(name))
    assert sort(src, "--archive", tmp_path / "archive") == 0
    out = dcmread(only_file(tmp_path / "archive"))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert out.LossyImageCompression == "01"
    assert out.pixel_array.shape == original.pixel_array.shape
    assert len(out.PixelData) >= out.Rows * out.Columns * out.SamplesPerPixel * (
        out.BitsAllocated // 8
    )


def test_classic_layout_path(tmp_path: Path, make_dicom: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    make_dicom(
        "a",
        folder=src,
        PatientID="AB 12",
        StudyDate="20240102",
        StudyDescription="CT Head w/o",
        SeriesDescription="Ax 5.0 [bone]",
        SeriesInstanceUID="1.2.3",
        InstanceNumber=7,
    )
    assert sort(src, "--archive", tmp_path / "archive") == 0
    rel = only_file(tmp_path / "archive").relative_to(tmp_path / "archive")
    assert rel.as_posix() == "ab_12/20240102/ct_head_w_o/ax_5_0__bone_/CT.1.2.3.7.dcm"


def test_real_no_meta_and_implicit_files_are_accepted(tmp_path: Path) -> None:
    """Files without preamble and file meta, Implicit VR, as old modalities wrote them."""
    src = tmp_path / "src"
    src.mkdir()
    ds = dcmread(vendor_file("CT_small.dcm"))
    pixels = ds.pixel_array
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM"
    (src / "nometa").write_bytes(raw)
    assert sort(src, "--archive", tmp_path / "archive") == 0
    out = dcmread(only_file(tmp_path / "archive"))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(out.pixel_array, pixels)


def test_bad_files_are_quarantined_with_a_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(vendor_file("MR_truncated.dcm"), src / "trunc")
    (src / "note.txt").write_text("not dicom")
    (src / "empty").write_bytes(b"")
    big = build_dataset(rows=4, columns=4)
    big.Rows = big.Columns = 65535
    big.NumberOfFrames = 1000
    big.save_as(src / "huge", enforce_file_format=True)
    assert sort(src, "--archive", tmp_path / "archive") == 1
    q = tmp_path / "quarantine"
    reasons = {}
    for sidecar in q.rglob("*.reason.json"):
        data = json.loads(sidecar.read_text())
        reasons[Path(data["source"]).name] = data["reason"]
        copy = sidecar.with_name(sidecar.name.removesuffix(".reason.json"))
        assert copy.read_bytes() == (src / Path(data["source"]).name).read_bytes()
    assert reasons == {
        "trunc": "truncated",
        "note.txt": "not_dicom",
        "empty": "not_dicom",
        "huge": "truncated",
    }
    assert archived(tmp_path / "archive") == []


def test_move_removes_sources_only_once_filed(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    for i in range(6):
        make_dicom(f"sub{i % 2}/f{i}", folder=src, InstanceNumber=i)
    (src / "junk").write_text("x")
    assert sort(src, "--archive", tmp_path / "archive", "--move") == 1
    assert len(archived(tmp_path / "archive")) == 6
    assert [p for p in src.rglob("*") if p.is_file()] == []
    assert (tmp_path / "quarantine" / "not_dicom" / "junk").read_text() == "x"


def test_sorting_again_finds_duplicates_and_writes_nothing_new(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    for i in range(4):
        make_dicom(f"f{i}", folder=src, InstanceNumber=i)
    assert sort(src, "--archive", tmp_path / "archive") == 0
    before = {p: p.read_bytes() for p in archived(tmp_path / "archive")}
    assert sort(src, "--archive", tmp_path / "archive", "--log-format", "json") == 0
    after = {p: p.read_bytes() for p in archived(tmp_path / "archive")}
    assert before == after and len(after) == 4


def test_collisions_get_numbered_names_and_conflicts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # two different instances, same path; and the same UID with different content
    build_dataset(SOPInstanceUID="1.2.3.1", InstanceNumber=1, seed=1).save_as(
        src / "a", enforce_file_format=True
    )
    build_dataset(SOPInstanceUID="1.2.3.2", InstanceNumber=1, seed=2).save_as(
        src / "b", enforce_file_format=True
    )
    build_dataset(SOPInstanceUID="1.2.3.1", InstanceNumber=1, seed=3).save_as(
        src / "c", enforce_file_format=True
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomwatch",
            "sort",
            str(src),
            "--archive",
            str(tmp_path / "archive"),
            "--log-format",
            "json",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines() if '"event": "file"' in line]
    outcomes = {Path(r["source"]).name: r["outcome"] for r in records}
    assert outcomes == {"a": "sorted", "b": "sorted", "c": "conflict"}
    names = sorted(p.name for p in archived(tmp_path / "archive"))
    assert names == [
        "CT.1.2.826.0.1.3680043.8.498.2.1.dcm",
        "CT.1.2.826.0.1.3680043.8.498.2.1~1.dcm",
        "CT.1.2.826.0.1.3680043.8.498.2.1~2.dcm",
    ]
    uids = sorted(str(dcmread(p).SOPInstanceUID) for p in archived(tmp_path / "archive"))
    assert uids == ["1.2.3.1", "1.2.3.1", "1.2.3.2"]


def test_dry_run_writes_nothing_and_reports_collisions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_dataset(SOPInstanceUID="1.2.3.1", InstanceNumber=1).save_as(
        src / "a", enforce_file_format=True
    )
    build_dataset(SOPInstanceUID="1.2.3.2", InstanceNumber=1).save_as(
        src / "b", enforce_file_format=True
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomwatch",
            "sort",
            str(src),
            "--archive",
            str(tmp_path / "archive"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("would file") == 2
    assert "collision" in out.stdout
    assert not (tmp_path / "archive").exists()
    assert not (tmp_path / "quarantine").exists()


def test_decompress_off_keeps_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(vendor_file("MR_small_jp2klossless.dcm"), src / "x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"decompress: false\nquarantine: {tmp_path / 'q'}\n")
    assert sort(src, "--archive", tmp_path / "archive", "--config", cfg) == 0
    assert only_file(tmp_path / "archive").read_bytes() == (src / "x").read_bytes()


def test_hostile_values_stay_inside_the_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    hostile = [
        "../../x",
        "/etc",
        "a/b\\c",
        ".",
        "..",
        "",
        "x\x00y",
        "\x01\x1f",
        "A" * 1000,
        "日本語" * 200,
        "CON",
        "trailing. ",
        "{PatientID}",
        "%(PatientID)s",
    ]
    for i, value in enumerate(hostile):
        ds = build_dataset(seed=i, SOPInstanceUID=f"1.2.3.{i}", InstanceNumber=i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about over-long values: we want them
            for kw in ("PatientID", "StudyDescription", "SeriesDescription"):
                setattr(ds, kw, value)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.save_as(src / f"h{i}", enforce_file_format=True)
    archive = tmp_path / "archive"
    assert sort(src, "--archive", archive) == 0
    files = archived(archive)
    assert len(files) == len(hostile)
    real_root = archive.resolve()
    for f in files:
        assert real_root in f.resolve().parents
        assert all(len(part.encode()) <= 255 for part in f.relative_to(archive).parts)
    outside = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and archive not in p.parents
        and src not in p.parents
        and tmp_path / ".dicomwatch-state" not in p.parents  # the archive index
    ]
    assert outside == []


def test_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("setle_seconds: 3\n")
    run = [sys.executable, "-m", "dicomwatch"]
    r = subprocess.run(
        [*run, "sort", str(tmp_path), "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 78 and "settle_seconds" in r.stderr
    r = subprocess.run(
        [*run, "sort", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    r = subprocess.run([*run, "sort"], capture_output=True, text=True, check=False)
    assert r.returncode == 2
    r = subprocess.run(
        [*run, "check-config", "--config", str(bad)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 78 and "did you mean 'settle_seconds'" in r.stderr


def test_sort_skips_symlinks_and_fifos(tmp_path: Path, make_dicom: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    secret = make_dicom("secret", folder=tmp_path / "outside", PatientID="SECRET")
    src.mkdir()
    os.symlink(secret, src / "link.dcm")
    os.mkfifo(src / "fifo.dcm")
    make_dicom("real", folder=src)
    assert sort(src, "--archive", tmp_path / "archive") == 0
    files = archived(tmp_path / "archive")
    assert len(files) == 1
    assert all(dcmread(f).PatientID != "SECRET" for f in files)


def test_a_text_file_is_called_not_dicom(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "report.txt").write_text("Patient list\nDoe, John\n" * 20)
    assert sort(src, "--archive", tmp_path / "archive") == 1
    (sidecar,) = (tmp_path / "quarantine").rglob("*.reason.json")
    data = json.loads(sidecar.read_text())
    assert data["reason"] == "not_dicom"
    assert data["error"].startswith("not a DICOM file: ")


def test_summary_says_failed_like_the_result_lines(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "sort", "--no-progress", str(src)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    summary = out.stderr.strip().splitlines()[-1]
    assert "quarantined 1, failed 0; 1 files in " in summary
    assert "errors" not in summary
