"""Hostile and awkward input through the real filing paths, one case per test.

Inbox-specific cases (links, FIFOs, folders, odd names) run ``dicomwatch run --once`` as
a real subprocess; content cases run ``dicomwatch sort`` in-process (real worker
processes).  Each test states its expected outcome: filed inside the archive,
quarantined with a named reason and the original bytes kept, or left alone and logged
once.  Content is built as raw bytes where pydicom would refuse or "fix" the hostile
value on writing, so what lands in the inbox is exactly what a hostile sender sends.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import stat
import struct
import threading
import time
import unicodedata
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_dataset, vendor_file
from daemon_helpers import DaemonProc, archived, archived_uids
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

from dicomwatch.cli import main

psutil = pytest.importorskip("psutil")

# Keywords of the default template, in template order.
TEMPLATE_KEYWORDS = {
    "PatientID": 0x00100020,
    "StudyDate": 0x00080020,
    "StudyDescription": 0x00081030,
    "SeriesDescription": 0x0008103E,
    "Modality": 0x00080060,
    "SeriesInstanceUID": 0x0020000E,
    "InstanceNumber": 0x00200013,
}
TEXT_KEYWORDS = ("PatientID", "StudyDescription", "SeriesDescription")
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_INSTANCE_UID = 0x00080018
PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
RSS_LIMIT = 500 * 1024 * 1024
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{n}" for d in ("com", "lpt") for n in "123456789"}


# --------------------------------------------------------------------------- raw bytes


def encode(ds: Dataset) -> bytes:
    """``ds`` as a file; pydicom's complaints about the values we chose are not the point."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def meta_end(data: bytes) -> int:
    """Offset of the data set: after preamble, magic and the group-length-sized file meta."""
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack_from("<L", data, 140)
    return 144 + group_length


def elements(data: bytes) -> dict[int, tuple[int, int, int]]:
    """Top-level Explicit VR LE elements: tag -> (offset, header length, value length)."""
    out: dict[int, tuple[int, int, int]] = {}
    pos = meta_end(data)
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            header = 8
        out[group << 16 | element] = (pos, header, length)
        if length == 0xFFFFFFFF:
            break
        pos += header + length
    return out


def raw_element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr.encode() in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def splice(data: bytes, changes: dict[int, tuple[str, bytes] | None]) -> bytes:
    """Replace or insert (``tag: (vr, raw value)``) or drop (``tag: None``) elements."""
    start = meta_end(data)
    kept = {tag: data[pos : pos + hdr + n] for tag, (pos, hdr, n) in elements(data).items()}
    for tag, change in changes.items():
        if change is None:
            kept.pop(tag, None)
        else:
            kept[tag] = raw_element(tag, *change)
    return data[:start] + b"".join(kept[t] for t in sorted(kept))


VR_OF = {
    "PatientID": "LO",
    "StudyDate": "DA",
    "StudyDescription": "LO",
    "SeriesDescription": "LO",
    "Modality": "CS",
    "SeriesInstanceUID": "UI",
    "InstanceNumber": "IS",
}


def with_values(
    value: bytes,
    keywords: tuple[str, ...] = tuple(TEMPLATE_KEYWORDS),
    charset: bytes | None = None,
    **tags: Any,
) -> bytes:
    """A valid instance whose ``keywords`` all hold the raw ``value``."""
    changes: dict[int, tuple[str, bytes] | None] = {
        TEMPLATE_KEYWORDS[k]: (VR_OF[k], value) for k in keywords
    }
    if charset is not None:
        changes[SPECIFIC_CHARACTER_SET] = ("CS", charset)
    return splice(encode(build_dataset(**tags)), changes)


# --------------------------------------------------------------------------- running


def sort(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, bytes], *extra: str
) -> tuple[int, list[dict[str, Any]]]:
    """``dicomwatch sort`` (in-process, one worker, JSON log) over ``files`` in ``src/``."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    capsys.readouterr()
    code = main(
        [
            "sort",
            "--no-progress",
            "--log-format",
            "json",
            "--workers",
            "1",
            str(src),
            "--archive",
            str(tmp_path / "archive"),
            *extra,
        ]
    )
    records = []
    for line in capsys.readouterr().err.splitlines():
        record = json.loads(line)  # every line must be one JSON record
        if record.get("event") == "file":
            records.append(record)
    return code, records


def sort_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    data: bytes,
    name: str = "in.dcm",
    *extra: str,
) -> dict[str, Any]:
    code, records = sort(tmp_path, capsys, {name: data}, *extra)
    assert len(records) == 1, records
    record = records[0]
    assert code == (0 if record["outcome"] in ("sorted", "duplicate", "conflict") else 1)
    return record


def assert_quarantined(tmp_path: Path, record: dict[str, Any], data: bytes, reason: str) -> None:
    """Quarantined under ``quarantine/<reason>/`` with the original bytes and a sidecar."""
    assert record["outcome"] == "quarantined", record
    assert record["reason"] == reason, record
    kept = Path(record["destination"])
    assert kept.parent == tmp_path / "quarantine" / reason
    assert kept.read_bytes() == data
    sidecar = json.loads(kept.with_name(kept.name + ".reason.json").read_text())
    assert sidecar["reason"] == reason and sidecar["outcome"] == "quarantined"
    assert archived(tmp_path / "archive") == []


def assert_filed(tmp_path: Path, record: dict[str, Any]) -> Path:
    """Sorted, inside the archive (symlinks resolved), every component a sane name."""
    assert record["outcome"] == "sorted", record
    dest = Path(record["destination"])
    archive = tmp_path / "archive"
    assert dest.is_file() and archive.resolve() in dest.resolve().parents
    for part in dest.relative_to(archive).parts:
        assert_sane_name(part)
    return dest


def assert_sane_name(part: str) -> None:
    raw = os.fsencode(part)
    assert 0 < len(raw) <= 255, part
    assert part not in (".", "..") and "/" not in part and "\x00" not in part
    raw.decode("utf-8")  # readable: no undecodable bytes smuggled into the archive
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in part), repr(part)


def files_outside(tmp_path: Path, *allowed: str) -> list[Path]:
    return [
        p
        for p in tmp_path.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(tmp_path).parts[0] not in allowed
    ]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default quarantine is ./quarantine: keep it in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, settle_seconds=0.1, workers=1)
    d.inbox.mkdir()
    yield d
    d.ensure_stopped()


def run_once(d: DaemonProc, expect: int) -> None:
    d.start("--once")
    assert d.wait_exit(60) == expect, d.log_path.read_text(errors="replace")[-3000:]


class PeakRss:
    """Polls the RSS of a process and all its descendants; keeps the largest single one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    continue
            self.samples += 1
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --------------------------------------------------------------------------- not DICOM


def test_zero_byte_file_is_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    record = sort_one(tmp_path, capsys, b"")
    assert_quarantined(tmp_path, record, b"", "not_dicom")


def test_plain_text_is_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    data = b"Patient: Smith\nThis is a referral letter, not an image.\n" * 20
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "not_dicom")


def test_png_bytes_are_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    data = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
        + struct.pack(">LL", 64, 64)
        + b"\x08\x00\x00\x00\x00"
        + bytes(range(256)) * 4
    )
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "not_dicom")


def test_zip_bytes_are_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("study/IM0001.dcm", encode(build_dataset()))
    data = buf.getvalue()
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "not_dicom")


def test_dicomdir_without_instance_uid_is_quarantined_not_dicom(
    tmp_path: Path, capsys: Any
) -> None:
    """A media directory is DICOM but no instance: it has no SOPInstanceUID to file by."""
    data = vendor_file("DICOMDIR").read_bytes()
    assert "SOPInstanceUID" not in dcmread(io.BytesIO(data))
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data, "DICOMDIR"), data, "not_dicom")


def test_garbage_after_preamble_and_magic_is_quarantined(tmp_path: Path, capsys: Any) -> None:
    """Garbage after ``DICM`` parses as an element claiming ~1.6 GB of a 2 KB file: the
    parser cannot tell that from a cut file, and says truncated; never filed."""
    data = b"\x00" * 128 + b"DICM" + random.Random(0).randbytes(2000)
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


def test_missing_sop_instance_uid_is_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    data = splice(encode(build_dataset()), {SOP_INSTANCE_UID: None})
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "not_dicom")


def test_empty_sop_instance_uid_is_quarantined_not_dicom(tmp_path: Path, capsys: Any) -> None:
    data = splice(encode(build_dataset()), {SOP_INSTANCE_UID: ("UI", b"\x00\x00")})
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "not_dicom")


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("preamble", "not_dicom"),  # no magic yet: nothing says it was ever DICOM
        ("meta_group_length_value", "truncated"),
        ("meta_element_value", "truncated"),
        ("meta_transfer_syntax_value", "truncated"),
        ("first_data_set_element_header", "truncated"),
        ("data_set_text_value", "truncated"),
        ("short_element_header", "truncated"),
        ("long_element_length_field", "truncated"),
    ],
)
def test_file_cut_inside_the_header(tmp_path: Path, capsys: Any, where: str, expected: str) -> None:
    full = encode(build_dataset())
    els = elements(full)
    start = meta_end(full)
    pixel_pos = els[PIXEL_DATA][0]
    cut = {
        "preamble": 64,
        "meta_group_length_value": 142,
        "meta_element_value": 160,
        "meta_transfer_syntax_value": full.index(b"1.2.840.10008.1.2.1") + 8,
        "first_data_set_element_header": start + 5,
        "data_set_text_value": els[SOP_INSTANCE_UID][0] + 8 + 10,
        "short_element_header": pixel_pos - 10 + 4,  # (0028,0103) US: tag only
        "long_element_length_field": pixel_pos + 9,  # OW header is 12 bytes: cut in length
    }[where]
    data = full[:cut]
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, expected)


def test_file_cut_inside_native_pixel_data(tmp_path: Path, capsys: Any) -> None:
    full = encode(build_dataset(rows=32, columns=32))
    data = full[: len(full) - 700]
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


def test_vendor_file_truncated_in_pixel_data(tmp_path: Path, capsys: Any) -> None:
    data = vendor_file("MR_truncated.dcm").read_bytes()
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


@pytest.mark.parametrize("into_fragment", [12, 200])
def test_jpeg2000_file_cut_inside_an_encapsulated_fragment(
    tmp_path: Path, capsys: Any, into_fragment: int
) -> None:
    full = vendor_file("JPEG2000.dcm").read_bytes()
    pixel = full.index(b"\xe0\x7f\x10\x00OB")
    first_fragment = pixel + 12 + 8 + 8  # element header, empty offset table, item header
    data = full[: first_fragment + into_fragment]
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


def test_text_element_length_overrunning_the_file(tmp_path: Path, capsys: Any) -> None:
    full = bytearray(encode(build_dataset()))
    pos, _, _ = elements(bytes(full))[TEMPLATE_KEYWORDS["StudyDescription"]]
    struct.pack_into("<H", full, pos + 6, 0xFFF0)
    data = bytes(full)
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


def test_pixel_data_length_field_overrunning_the_file(tmp_path: Path, capsys: Any) -> None:
    full = bytearray(encode(build_dataset()))
    pos, _, _ = elements(bytes(full))[PIXEL_DATA]
    struct.pack_into("<L", full, pos + 8, 0x7FFFFFF0)
    data = bytes(full)
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


def test_pixel_data_shorter_than_rows_and_columns_declare(tmp_path: Path, capsys: Any) -> None:
    """A complete file whose header promises 4x the pixel data it holds."""
    data = encode(build_dataset(rows=8, columns=8, Rows=16, Columns=16))
    record = sort_one(tmp_path, capsys, data)
    assert_quarantined(tmp_path, record, data, "truncated")
    assert "requires 512" in record["message"]


# --------------------------------------------------------------------------- bombs


def test_huge_native_geometry_over_a_few_bytes_is_refused_with_flat_memory(
    daemon: DaemonProc,
) -> None:
    """65535 x 65535 x 1000 frames (8.6 TB) declared over 32 bytes of pixel data."""
    data = encode(build_dataset(rows=4, columns=4, Rows=65535, Columns=65535, NumberOfFrames=1000))
    (daemon.inbox / "huge.dcm").write_bytes(data)
    with PeakRss(os.getpid()) as rss:
        daemon.start("--once")
        assert daemon.wait_exit(60) == 1
    assert rss.samples > 5 and rss.peak < RSS_LIMIT, rss.peak
    [record] = daemon.files()
    assert record["outcome"] == "quarantined" and record["reason"] == "truncated"
    assert (daemon.quarantine / "truncated" / "huge.dcm").read_bytes() == data


def test_huge_encapsulated_geometry_is_refused_before_decoding(daemon: DaemonProc) -> None:
    """Same geometry, JPEG 2000, one 2-byte fragment per frame: complete as far as the
    item structure goes, so only the size check stands between it and the decoder."""
    ds = build_dataset(rows=4, columns=4, Rows=65535, Columns=65535, NumberOfFrames=1000)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    items = [b"\xfe\xff\x00\xe0\x00\x00\x00\x00"]
    items += [b"\xfe\xff\x00\xe0\x02\x00\x00\x00\xff\x4f"] * 1000  # pydicom adds the delimiter
    ds.PixelData = b"".join(items)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = encode(ds)
    (daemon.inbox / "huge.dcm").write_bytes(data)
    with PeakRss(os.getpid()) as rss:
        daemon.start("--once")
        assert daemon.wait_exit(60) == 1
    assert rss.samples > 5 and rss.peak < RSS_LIMIT, rss.peak
    [record] = daemon.files()
    assert record["outcome"] == "quarantined" and record["reason"] == "too_large", record
    assert (daemon.quarantine / "too_large" / "huge.dcm").read_bytes() == data


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jp2klossless.dcm"])
def test_jpeg2000_siz_larger_than_header_is_refused_quickly(
    tmp_path: Path, capsys: Any, name: str
) -> None:
    """SIZ claims 60000 x 60000 under Rows/Columns of 1024 x 256 (or 64 x 64): decoding it
    would take minutes and ~20 GB; it must be refused from the codestream header."""
    full = bytearray(vendor_file(name).read_bytes())
    siz = full.index(b"\xff\x4f\xff\x51")
    struct.pack_into(">LL", full, siz + 8, 60000, 60000)  # Xsiz, Ysiz
    data = bytes(full)
    started = time.monotonic()
    record = sort_one(tmp_path, capsys, data)
    assert time.monotonic() - started < 30  # the whole sort run, worker start included
    assert_quarantined(tmp_path, record, data, "too_large")
    assert record["ms"] < 3000
    assert "60000x60000" in record["message"]


def test_deflate_bomb_is_refused_before_inflating(tmp_path: Path, capsys: Any) -> None:
    """~250 KB of deflated data set that inflates to 256 MiB of private zeros (limit 16 MiB)."""
    plain = encode(build_dataset())
    start = meta_end(plain)
    head = bytearray(plain[:start])
    ts = head.index(b"1.2.840.10008.1.2.1\x00")
    deflated_uid = DeflatedExplicitVRLittleEndian.encode()
    assert len(deflated_uid) == 22
    # Transfer syntax element: 20 bytes -> 22 bytes; fix its length and the group length.
    head[ts - 2 : ts + 20] = struct.pack("<H", 22) + deflated_uid
    struct.pack_into("<L", head, 140, struct.unpack_from("<L", head, 140)[0] + 2)
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [bytes(head), body.compress(plain[start:])]
    private = struct.pack("<HH", 0x0009, 0x1001) + b"UN\x00\x00" + struct.pack("<L", 1 << 28)
    out.append(body.compress(raw_element(0x00090010, "LO", b"BOMB") + private))
    zeros = bytes(1 << 20)
    for _ in range(256):
        out.append(body.compress(zeros))
    out.append(body.flush())
    data = b"".join(out)
    assert len(data) < 1024 * 1024
    config = tmp_path / "c.yaml"
    config.write_text("max_decoded_bytes: 16777216\n")
    with PeakRss(os.getpid()) as rss:
        record = sort_one(tmp_path, capsys, data, "bomb.dcm", "--config", str(config))
    assert_quarantined(tmp_path, record, data, "too_large")
    assert rss.peak < RSS_LIMIT, rss.peak
    assert record["ms"] < 10_000


def test_rle_segment_decoding_past_its_frame_is_a_decode_error(tmp_path: Path, capsys: Any) -> None:
    """Replicate runs (header byte 0xDD: 36 copies) that overrun the 8192-byte frame: the
    Rust RLE decoder panics (pyo3 PanicException, a BaseException) instead of raising."""
    full = bytearray(vendor_file("MR_small_RLE.dcm").read_bytes())
    full[4710:4765] = b"\xdd" * 55  # inside the second segment
    data = bytes(full)
    record = sort_one(tmp_path, capsys, data)
    assert_quarantined(tmp_path, record, data, "decode_error")


def test_unknown_vr_of_undefined_length_in_an_item_is_not_archived_unreadable(
    tmp_path: Path, capsys: Any
) -> None:
    """0xFF over a sequence item's element header: pydicom reads (FFFF,FFFF) with VR
    0xFFFF as UN of undefined length, and would write it back as UN of undefined length,
    which no reader can parse.  Never archived like that: quarantined as encode_error."""
    full = bytearray(vendor_file("JPEG2000.dcm").read_bytes())
    full[925:944] = b"\xff" * 19  # inside (0008,2112) Source Image Sequence, item 1
    data = bytes(full)
    record = sort_one(tmp_path, capsys, data)
    assert_quarantined(tmp_path, record, data, "encode_error")
    assert "does not read back" in record["message"]


def test_truncated_sop_instance_uid_with_an_unknown_vr(tmp_path: Path, capsys: Any) -> None:
    """The UID element itself is cut short and has a VR pydicom does not know: reading it
    to see whether the file has a UID must not escape as NotImplementedError."""
    full = bytearray(encode(build_dataset()))
    pos, _, _ = elements(bytes(full))[SOP_INSTANCE_UID]
    full[pos + 4 : pos + 8] = b"U'" + struct.pack("<H", 0x2727)
    data = bytes(full)
    assert_quarantined(tmp_path, sort_one(tmp_path, capsys, data), data, "truncated")


# --------------------------------------------------------------------------- hostile values


@pytest.mark.parametrize("value", [b"../../x", b"/etc", b"a/b\\c"], ids=["dotdot", "abs", "seps"])
def test_path_traversal_in_every_template_keyword_stays_inside(
    tmp_path: Path, capsys: Any, value: bytes
) -> None:
    data = with_values(value)
    record = sort_one(tmp_path, capsys, data)
    dest = assert_filed(tmp_path, record)
    rel = dest.relative_to(tmp_path / "archive")
    assert len(rel.parts) == 5, rel  # a '/' in a value never adds a level
    assert dest.read_bytes() == data
    # (and the archive index in the default state_dir, ./.dicomwatch-state)
    assert files_outside(tmp_path, "archive", "src", ".dicomwatch-state") == []


def test_nul_and_control_characters_in_values(tmp_path: Path, capsys: Any) -> None:
    data = with_values(b"x\x00y\x01\x1b[31mz\x7f\x9b", (*TEXT_KEYWORDS, "Modality"))
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    assert dest.relative_to(tmp_path / "archive").parts[0].startswith("x_y_")


def test_thousand_character_values(tmp_path: Path, capsys: Any) -> None:
    data = with_values(b"A" * 1000)
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    parts = dest.relative_to(tmp_path / "archive").parts
    assert all(len(os.fsencode(p)) <= 255 for p in parts)
    assert parts[-1].endswith(".dcm")


def test_multibyte_values_longer_than_255_bytes(tmp_path: Path, capsys: Any) -> None:
    """Two patients whose UTF-8 ids share the first 255 bytes stay apart (hash suffix)."""
    long_a = ("日本語" * 40 + "A").encode()
    long_b = ("日本語" * 40 + "B").encode()
    files = {
        "a.dcm": with_values(long_a, TEXT_KEYWORDS, b"ISO_IR 192", seed=1),
        "b.dcm": with_values(long_b, TEXT_KEYWORDS, b"ISO_IR 192", seed=2),
    }
    code, records = sort(tmp_path, capsys, files)
    assert code == 0
    dests = [assert_filed(tmp_path, r) for r in records]
    patients = {d.relative_to(tmp_path / "archive").parts[0] for d in dests}
    assert len(patients) == 2
    assert all(p.startswith("日本語日本語") and len(p.encode()) <= 255 for p in patients)


@pytest.mark.parametrize("charset", [b"ISO_IR 100", b"ISO_IR 192"])
def test_bytes_invalid_for_the_declared_character_set(
    tmp_path: Path, capsys: Any, charset: bytes
) -> None:
    data = with_values(b"\xff\xfe\x80abc\xc3", TEXT_KEYWORDS, charset)
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    assert dest.read_bytes() == data
    assert "abc" in dest.relative_to(tmp_path / "archive").parts[0]


def test_windows_reserved_names_as_values(tmp_path: Path, capsys: Any) -> None:
    base = encode(build_dataset())
    data = splice(
        base,
        {
            TEMPLATE_KEYWORDS["PatientID"]: ("LO", b"CON"),
            TEMPLATE_KEYWORDS["StudyDescription"]: ("LO", b"AUX"),
            TEMPLATE_KEYWORDS["SeriesDescription"]: ("LO", b"nul.txt"),
            TEMPLATE_KEYWORDS["Modality"]: ("CS", b"COM1"),
        },
    )
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    for part in dest.relative_to(tmp_path / "archive").parts:
        assert part.split(".", 1)[0].rstrip(" ").lower() not in _RESERVED, part


def test_trailing_dots_and_spaces_in_values(tmp_path: Path, capsys: Any) -> None:
    data = with_values(b"abc. . .", (*TEXT_KEYWORDS, "InstanceNumber"))
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    for part in dest.relative_to(tmp_path / "archive").parts:
        assert not part.endswith((".", " ")), part


def test_instance_number_that_is_not_a_number(tmp_path: Path, capsys: Any) -> None:
    data = with_values(b"../x", ("InstanceNumber",))
    dest = assert_filed(tmp_path, sort_one(tmp_path, capsys, data))
    assert dest.parent.relative_to(tmp_path / "archive").as_posix() == (
        "pid001/20240101/ct_head/axial_5mm"
    )


def test_source_name_of_255_bytes_is_quarantined_with_its_sidecar(
    tmp_path: Path, capsys: Any
) -> None:
    """The quarantine copy keeps the source name; with ``.reason.json`` added the sidecar
    name must still fit in 255 bytes, or the file is retried forever."""
    name = "n" * 251 + ".dcm"
    record = sort_one(tmp_path, capsys, b"not dicom", name)
    assert_quarantined(tmp_path, record, b"not dicom", "not_dicom")
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "quarantine").rglob("*"))


# --------------------------------------------------------------------------- collisions


def test_two_instances_mapping_to_one_path_get_a_numbered_name(tmp_path: Path, capsys: Any) -> None:
    a = encode(build_dataset(seed=1, SOPInstanceUID="1.2.3.1"))
    b = encode(build_dataset(seed=2, SOPInstanceUID="1.2.3.2"))
    code, records = sort(tmp_path, capsys, {"a.dcm": a, "b.dcm": b})
    assert code == 0
    assert [r["outcome"] for r in records] == ["sorted", "sorted"]
    assert records[1]["reason"] == "name_taken"
    files = archived(tmp_path / "archive")
    assert [f.name for f in files] == [
        "CT.1.2.826.0.1.3680043.8.498.2.1.dcm",
        "CT.1.2.826.0.1.3680043.8.498.2.1~1.dcm",
    ]
    assert [f.read_bytes() for f in files] == [a, b]


def test_same_instance_twice_is_one_copy(tmp_path: Path, capsys: Any) -> None:
    data = encode(build_dataset())
    code, records = sort(tmp_path, capsys, {"a.dcm": data, "b.dcm": data})
    assert code == 0
    assert [r["outcome"] for r in records] == ["sorted", "duplicate"]
    [only] = archived(tmp_path / "archive")
    assert only.read_bytes() == data


def test_same_uid_with_different_content_keeps_both(tmp_path: Path, capsys: Any) -> None:
    a = encode(build_dataset(seed=1, SOPInstanceUID="1.2.3.9"))
    b = encode(build_dataset(seed=2, SOPInstanceUID="1.2.3.9"))
    code, records = sort(tmp_path, capsys, {"a.dcm": a, "b.dcm": b})
    assert code == 0
    assert [r["outcome"] for r in records] == ["sorted", "conflict"]
    assert records[1]["reason"] == "same_uid_different_content"
    assert sorted(f.read_bytes() for f in archived(tmp_path / "archive")) == sorted([a, b])


# --------------------------------------------------------------------------- the inbox


def dicom(uid: str, **tags: Any) -> bytes:
    return encode(
        build_dataset(SOPInstanceUID=uid, InstanceNumber=int(uid.rsplit(".", 1)[1]), **tags)
    )


def every_file_bytes(*roots: Path) -> list[bytes]:
    return [
        p.read_bytes()
        for r in roots
        if r.exists()
        for p in r.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]


def test_symlink_to_an_outside_dicom_file_is_never_followed(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    secret = tmp_path / "outside" / "secret.dcm"
    secret.parent.mkdir()
    secret_bytes = dicom("1.2.3.666", PatientID="SECRET")
    secret.write_bytes(secret_bytes)
    os.symlink(secret, daemon.inbox / "link.dcm")
    (daemon.inbox / "real.dcm").write_bytes(dicom("1.2.3.1"))
    run_once(daemon, 0)
    assert archived_uids(daemon.archive) == ["1.2.3.1"]
    assert secret_bytes not in every_file_bytes(daemon.archive, daemon.quarantine)
    assert (daemon.inbox / "link.dcm").is_symlink() and secret.read_bytes() == secret_bytes
    assert daemon.count_lines(str(daemon.inbox / "link.dcm")) == 1, "left alone, logged once"
    assert not any(b"1.2.3.666" in b for b in every_file_bytes(daemon.archive, daemon.quarantine))
    assert [r["source"] for r in daemon.files()] == [str(daemon.inbox / "real.dcm")]


def test_symlink_to_an_outside_folder_is_not_entered(daemon: DaemonProc, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.dcm").write_bytes(dicom("1.2.3.7"))
    os.symlink(outside, daemon.inbox / "study")
    run_once(daemon, 0)
    assert archived(daemon.archive) == []
    assert (outside / "a.dcm").read_bytes() == dicom("1.2.3.7")
    assert daemon.count_lines(str(daemon.inbox / "study")) == 1


def test_hard_link_to_an_outside_file_is_filed_and_the_outside_file_kept(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.dcm"
    data = dicom("1.2.3.5")
    outside.write_bytes(data)
    os.link(outside, daemon.inbox / "hl.dcm")
    run_once(daemon, 0)
    [filed] = archived(daemon.archive)
    assert filed.read_bytes() == data
    assert outside.read_bytes() == data and outside.stat().st_nlink == 1
    assert not (daemon.inbox / "hl.dcm").exists()


def test_fifo_named_like_a_dicom_file_never_blocks(daemon: DaemonProc) -> None:
    os.mkfifo(daemon.inbox / "x.dcm")
    (daemon.inbox / "real.dcm").write_bytes(dicom("1.2.3.1"))
    run_once(daemon, 0)
    assert archived_uids(daemon.archive) == ["1.2.3.1"]
    assert stat.S_ISFIFO(os.lstat(daemon.inbox / "x.dcm").st_mode)
    assert daemon.count_lines(str(daemon.inbox / "x.dcm")) == 1
    assert not daemon.quarantine.exists() or list(daemon.quarantine.rglob("*.json")) == []


def test_unix_socket_named_like_a_dicom_file_is_left_alone(daemon: DaemonProc) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("inbox/sock.dcm")  # relative: AF_UNIX paths are short; cwd is tmp_path
        (daemon.inbox / "real.dcm").write_bytes(dicom("1.2.3.1"))
        run_once(daemon, 0)
    finally:
        sock.close()
    assert archived_uids(daemon.archive) == ["1.2.3.1"]
    assert stat.S_ISSOCK(os.lstat(daemon.inbox / "sock.dcm").st_mode)
    assert daemon.count_lines(str(daemon.inbox / "sock.dcm")) == 1


def test_folder_named_like_a_dicom_file_is_a_folder(daemon: DaemonProc) -> None:
    (daemon.inbox / "x.dcm").mkdir()
    (daemon.inbox / "x.dcm" / "inner.dcm").write_bytes(dicom("1.2.3.4"))
    run_once(daemon, 0)
    assert archived_uids(daemon.archive) == ["1.2.3.4"]
    assert (daemon.inbox / "x.dcm").is_dir()
    [record] = daemon.files()
    assert record["source"] == str(daemon.inbox / "x.dcm" / "inner.dcm")


def test_file_name_with_newlines_keeps_each_log_line_one_line(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, settle_seconds=0.1, workers=1, log_format="text")
    d.inbox.mkdir()
    try:
        (d.inbox / "evil\n2024-01-01 ERROR forged.dcm").write_bytes(dicom("1.2.3.1"))
        (d.inbox / "bad\nname.txt").write_bytes(b"not dicom")
        os.symlink("/etc/passwd", d.inbox / "link\nforged.dcm")
        run_once(d, 1)
    finally:
        d.ensure_stopped()
    assert archived_uids(d.archive) == ["1.2.3.1"]
    lines = d.log_path.read_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
    assert all(stamp.match(line) for line in lines), lines
    assert sum(" sorted src=" in line for line in lines) == 1
    assert sum(" quarantined src=" in line for line in lines) == 1
    assert not any("ERROR forged" in line and "\\n" not in line for line in lines)
    assert (d.quarantine / "not_dicom" / "bad_name.txt").read_bytes() == b"not dicom"


@pytest.mark.parametrize("content", ["dicom", "junk"])
def test_file_name_with_non_utf8_bytes(daemon: DaemonProc, content: str) -> None:
    raw_name = b"caf\xe9-\xff\xfe.dcm"
    data = dicom("1.2.3.8") if content == "dicom" else b"junk \xff\xfe"
    with open(os.path.join(os.fsencode(daemon.inbox), raw_name), "wb") as fh:
        fh.write(data)
    run_once(daemon, 0 if content == "dicom" else 1)
    for line in daemon.log_path.read_text(errors="surrogateescape").splitlines():
        json.loads(line)  # one JSON record per line
    [record] = daemon.files()
    assert os.fsencode(record["source"]) == os.fsencode(daemon.inbox) + b"/" + raw_name
    assert os.listdir(os.fsencode(daemon.inbox)) == [b".dicomwatch"]
    if content == "dicom":
        assert record["outcome"] == "sorted"
        [filed] = archived(daemon.archive)
        assert filed.read_bytes() == data
    else:
        assert record["outcome"] == "quarantined" and record["reason"] == "not_dicom"
        kept = Path(record["destination"])
        assert_sane_name(kept.name)
        assert kept.read_bytes() == data
        sidecar = json.loads(kept.with_name(kept.name + ".reason.json").read_text())
        assert os.fsencode(sidecar["source"]).endswith(raw_name)


def test_deeply_nested_long_names_are_quarantined_not_retried_forever(
    daemon: DaemonProc,
) -> None:
    """The quarantine name is built from the inbox-relative path, which may be far longer
    than one file name may be."""
    folder = daemon.inbox / ("d" * 200) / ("e" * 200)
    folder.mkdir(parents=True)
    (folder / ("n" * 200 + ".dcm")).write_bytes(b"not dicom")
    run_once(daemon, 1)
    [record] = daemon.files()
    assert record["outcome"] == "quarantined" and record["reason"] == "not_dicom", record
    kept = Path(record["destination"])
    assert kept.read_bytes() == b"not dicom"
    assert all(len(p.name.encode()) <= 255 for p in daemon.quarantine.rglob("*"))
    assert kept.with_name(kept.name + ".reason.json").is_file()


def test_zero_byte_file_in_the_inbox_is_quarantined(daemon: DaemonProc) -> None:
    (daemon.inbox / "empty.dcm").write_bytes(b"")
    run_once(daemon, 1)
    [record] = daemon.files()
    assert record["outcome"] == "quarantined" and record["reason"] == "not_dicom"
    assert (daemon.quarantine / "not_dicom" / "empty.dcm").read_bytes() == b""
