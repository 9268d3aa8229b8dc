"""dicomio: parsing hostile bytes, completeness, header values, encoding.

Uses pydicom's bundled test files (never downloaded: a missing file skips the test).
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomwatch import decode, dicomio
from dicomwatch.errors import (
    DecodeError,
    EncodeError,
    IncompleteError,
    NotDicomError,
    RejectedError,
    TooLargeError,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def sample(name: str) -> bytes:
    """Bytes of a pydicom test file; skip (never download) if this pydicom lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(path)).read_bytes()


def reference(data: bytes) -> Dataset:
    """The file as plain pydicom reads it, for comparisons."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=True)


def reference_pixels(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference(data).pixel_array


def load(data: bytes) -> Dataset:
    """What the pipeline does before filing: parse, then check completeness."""
    ds = dicomio.parse(data)
    dicomio.check_complete(ds)
    return ds


def meta_end(data: bytes) -> int:
    """Offset of the data set in a file with preamble and file meta."""
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack_from("<L", data, 132 + 8)
    return 132 + 12 + int(group_length)


def pixel_value_offset(data: bytes) -> int:
    """Offset of the Pixel Data value in an Explicit VR Little Endian file."""
    header = data.rfind(b"\xe0\x7f\x10\x00")
    assert header > 0
    return header + 12


def minimal_dataset(**tags: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC_STORAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.PatientID = "PID"
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def image_dataset(
    rows: int = 4, columns: int = 4, bits: int = 16, frames: int = 1, pixel_bytes: int | None = None
) -> Dataset:
    ds = minimal_dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    size = (rows * columns * frames * bits + 7) // 8 if pixel_bytes is None else pixel_bytes
    ds.PixelData = bytes(size)
    return ds


def with_syntax(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


# --------------------------------------------------------------------------- keywords


def test_known_keywords_are_exact_dictionary_keywords() -> None:
    assert dicomio.is_known_keyword("PatientName")
    assert dicomio.is_known_keyword("SOPInstanceUID")
    assert not dicomio.is_known_keyword("patientname")
    assert not dicomio.is_known_keyword("PatientNme")
    assert not dicomio.is_known_keyword("")


@pytest.mark.parametrize(
    ("typo", "expected"),
    [
        ("patientname", "PatientName"),
        ("PatientNme", "PatientName"),
        ("StudyDescripton", "StudyDescription"),
        ("SeriesInstanceUid", "SeriesInstanceUID"),
        ("Modality", "Modality"),
    ],
)
def test_suggest_keyword_finds_the_intended_keyword(typo: str, expected: str) -> None:
    assert dicomio.suggest_keyword(typo) == expected


def test_suggest_keyword_gives_up_on_nonsense() -> None:
    assert dicomio.suggest_keyword("Xq7Zz") is None


# --------------------------------------------------------------------------- parse: accepted


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("CT_small.dcm", ExplicitVRLittleEndian),
        ("MR_small.dcm", ExplicitVRLittleEndian),
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("ExplVR_LitEndNoMeta.dcm", ExplicitVRLittleEndian),
        ("ExplVR_BigEndNoMeta.dcm", ExplicitVRBigEndian),
        ("JPEG2000.dcm", JPEG2000),
        ("SC_rgb_rle_2frame.dcm", RLELossless),
    ],
)
def test_parse_accepts_every_encoding(name: str, syntax: str) -> None:
    data = sample(name)
    ds = load(data)
    assert ds.SOPInstanceUID == reference(data).SOPInstanceUID
    assert dicomio.transfer_syntax(ds) == syntax


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("CT_small.dcm", ExplicitVRLittleEndian),
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ],
)
def test_parse_accepts_files_without_preamble_and_file_meta(name: str, syntax: str) -> None:
    data = sample(name)
    ds = load(data[meta_end(data) :])
    assert ds.SOPInstanceUID == reference(data).SOPInstanceUID
    assert dicomio.transfer_syntax(ds) == syntax  # inferred from how pydicom read it
    assert not dicomio.is_plain_explicit_le(ds)
    assert np.array_equal(ds.pixel_array, reference_pixels(data))


def test_pydicom_no_meta_test_file_starts_with_a_stray_byte() -> None:
    # pydicom's no_meta.dcm is CT_small.dcm from one byte too early (the last padding
    # byte of the file meta), so it cannot be read as DICOM; without that byte it can.
    data = sample("no_meta.dcm")
    with pytest.raises(NotDicomError):
        dicomio.parse(data)
    assert dicomio.parse(data[1:]).Modality == "CT"


def _converted(ds: Dataset) -> set[int]:
    return {t for t in list(ds.keys()) if not isinstance(ds.get_item(t), RawDataElement)}


def test_parse_of_explicit_little_endian_converts_only_what_is_read() -> None:
    ds = dicomio.parse(sample("CT_small.dcm"))
    converted = _converted(ds)
    assert {0x00080018, 0x00280010, 0x00280011, 0x00280100, 0x7FE00010} <= converted
    sequences = {t for t in list(ds.keys()) if ds.get_item(t).VR == "SQ"}
    assert converted <= dicomio._USED_TAGS | sequences
    assert isinstance(ds.get_item(0x00100010), RawDataElement)  # PatientName


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_parse_of_other_encodings_converts_every_element(name: str) -> None:
    ds = dicomio.parse(sample(name))
    assert _converted(ds) == set(ds.keys())


def test_parse_converts_every_sequence_to_check_its_items() -> None:
    ds = dicomio.parse(sample("rtplan.dcm"))
    sequences = [t for t in list(ds.keys()) if ds.get_item(t).VR == "SQ"]
    assert sequences
    assert set(sequences) <= _converted(ds)


def _with_raw_element(
    tag: int, vr: str | None, value: bytes, *, implicit: bool = False, length: int | None = None
) -> bytes:
    """A small image file holding one more element, written exactly as given."""
    ds = image_dataset()
    ds[0x7FE00010].VR = "OW"
    ds[tag] = RawDataElement(
        Tag(tag), vr, len(value) if length is None else length, value, 0, implicit, True
    )
    ds.set_original_encoding(implicit, True, "iso8859")
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()


def _with_malformed_unread_element(*, implicit: bool) -> bytes:
    """An image whose Largest Image Pixel Value (never read here) is 1 byte, not 2."""
    return _with_raw_element(0x00280107, None if implicit else "US", b"\x01", implicit=implicit)


def test_malformed_unread_value_of_explicit_little_endian_is_kept_as_it_was() -> None:
    data = _with_malformed_unread_element(implicit=False)
    with pytest.raises(Exception):  # noqa: B017 - pydicom's own error
        _ = reference(data).LargestImagePixelValue
    out = dicomio.encode(load(data))
    back = reference(out)
    assert back.get_item(0x00280107).value == b"\x01"
    assert back.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.99"


def test_malformed_value_of_implicit_vr_is_rejected_since_it_must_be_re_encoded() -> None:
    data = _with_malformed_unread_element(implicit=True)
    with pytest.raises(NotDicomError, match=r"\(0028,0107\) cannot be decoded"):
        dicomio.parse(data)


def test_parse_keeps_warnings_of_pydicom_to_itself() -> None:
    # SC_rgb_jpeg.dcm makes pydicom warn about an implicit VR sequence in an explicit VR
    # file; pytest turns warnings into errors, so this passes only if it is contained.
    dicomio.parse(sample("SC_rgb_jpeg.dcm"))


# --------------------------------------------------------------------------- parse: rejected


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("report.txt", "not an image\n" * 50)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(b"Patient list\nDoe, John\t1970-01-01\n" * 40, id="text"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), id="png"),
        pytest.param(_zip_bytes(), id="zip"),
        pytest.param(np.random.default_rng(1).bytes(4096), id="random-4k"),
        pytest.param(np.random.default_rng(2).bytes(64), id="random-64"),
        pytest.param(b"<?xml version='1.0'?><dicom/>" * 10, id="xml"),
    ],
)
def test_parse_rejects_what_is_not_dicom(data: bytes) -> None:
    with pytest.raises(NotDicomError):
        dicomio.parse(data)


def test_parse_rejects_a_dataset_without_sop_instance_uid() -> None:
    data = dicomio.encode(minimal_dataset())
    patched = data.replace(b"1.2.826.0.1.3680043.8.498.99", b" " * 28)
    with pytest.raises(NotDicomError, match="SOPInstanceUID"):
        dicomio.parse(patched)
    ds = minimal_dataset(SOPInstanceUID=None)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    with pytest.raises(NotDicomError, match="SOPInstanceUID"):
        dicomio.parse(buffer.getvalue())


def test_parse_rejects_an_element_pydicom_cannot_decode() -> None:
    ds = minimal_dataset()
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", 1, b"\x01", 0, False, True)
    ds.set_original_encoding(False, True, "iso8859")
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)  # Rows of 1 byte
    with pytest.raises(NotDicomError, match=r"\(0028,0010\) cannot be decoded"):
        dicomio.parse(buffer.getvalue())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_parse_of_arbitrary_bytes_only_rejects(data: bytes) -> None:
    try:
        ds = dicomio.parse(data)
    except (NotDicomError, IncompleteError):
        return
    assert str(ds.SOPInstanceUID).strip()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_parse_of_damaged_dicom_only_rejects(data: st.DataObject) -> None:
    original = bytearray(sample("MR_small.dcm")[:1600])  # header and some pixels
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RejectedError):
        load(bytes(original))


# --------------------------------------------------------------------------- truncation


def test_mr_truncated_is_incomplete() -> None:
    data = sample("MR_truncated.dcm")
    # pydicom itself accepts it, with a short pixel data value.
    assert len(reference(data).PixelData) < 64 * 64 * 2
    with pytest.raises(IncompleteError, match="8192"):
        load(data)


@pytest.mark.parametrize("into_pixels", [1, 2, 1000, 8190, 8191])
def test_native_file_cut_in_the_pixel_data_is_incomplete(into_pixels: int) -> None:
    data = sample("MR_small.dcm")
    cut = pixel_value_offset(data) + into_pixels
    with pytest.raises(IncompleteError):
        load(data[:cut])


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_file_cut_in_the_header_is_never_accepted(name: str, fraction: float) -> None:
    data = sample(name)
    start, end = 133, data.rfind(b"\xe0\x7f\x10\x00") + 8
    cut = int(start + (end - start) * fraction)
    for offset in (cut, cut + 1, cut + 3):  # inside values and element headers
        with pytest.raises((IncompleteError, NotDicomError)):
            load(data[:offset])


def test_file_cut_inside_a_trailing_element_header_is_incomplete() -> None:
    # MR_small.dcm ends with Data Set Trailing Padding after its pixel data; pydicom
    # silently ignores fewer than 8 bytes where an element header should be.
    data = sample("MR_small.dcm")
    padding = data.rfind(b"\xfc\xff\xfc\xff")
    assert load(data[:padding]).Rows == 64  # cut exactly before it: the image is whole
    with pytest.raises(IncompleteError, match="element header"):
        load(data[: padding + 5])


def test_pydicom_drops_encapsulated_pixel_data_cut_before_its_delimiter() -> None:
    """The behaviour parse() has to catch: no exception, only a warning."""
    data = sample("JPEG2000.dcm")
    full = reference(data)
    value = full.PixelData
    assert full[0x7FE00010].is_undefined_length
    assert value.startswith(b"\xfe\xff\x00\xe0")  # Basic Offset Table item first
    assert value.endswith(b"\xff\xd9")  # the codestream's EOC: delimiter not kept
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    with pytest.warns(UserWarning, match="End of file reached before delimiter"):
        cut = dcmread(io.BytesIO(data[:-100]), force=True)
    assert "PixelData" not in cut


@pytest.mark.parametrize("from_end", [1, 4, 5, 8, 9, 10, 50, 100, 200, 258])
def test_encapsulated_file_cut_mid_fragment_is_incomplete(from_end: int) -> None:
    data = sample("JPEG2000.dcm")
    with pytest.raises(IncompleteError):
        load(data[:-from_end])


def test_multi_fragment_file_cut_is_incomplete() -> None:
    data = sample("SC_rgb_rle_2frame.dcm")
    for from_end in (8, 300, 680, 700, 1300):
        with pytest.raises(IncompleteError):
            load(data[:-from_end])


def test_deflated_file_cut_is_incomplete() -> None:
    data = sample("image_dfl.dcm")
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(IncompleteError):
            load(data[:cut])


def test_file_meta_alone_is_incomplete() -> None:
    data = sample("CT_small.dcm")
    with pytest.raises(IncompleteError):
        dicomio.parse(data[: meta_end(data)])
    with pytest.raises(IncompleteError):
        dicomio.parse(data[: meta_end(data) - 20])


# --------------------------------------------------------------------------- check_complete


def test_check_complete_names_both_lengths() -> None:
    ds = image_dataset(rows=4, columns=4, pixel_bytes=31)
    with pytest.raises(IncompleteError, match=r"31 bytes.*requires 32"):
        dicomio.check_complete(ds)


@pytest.mark.parametrize("extra", [1, 2, 1000])
def test_check_complete_accepts_longer_pixel_data(extra: int) -> None:
    dicomio.check_complete(image_dataset(rows=4, columns=4, pixel_bytes=32 + extra))


def test_check_complete_counts_frames_and_samples() -> None:
    ds = image_dataset(rows=4, columns=4, bits=8, frames=3)
    dicomio.check_complete(ds)
    ds.PixelData = bytes(47)
    with pytest.raises(IncompleteError):
        dicomio.check_complete(ds)
    ds = image_dataset(rows=2, columns=2, bits=8, pixel_bytes=12)
    ds.SamplesPerPixel = 3
    dicomio.check_complete(ds)
    ds.PixelData = bytes(11)
    with pytest.raises(IncompleteError):
        dicomio.check_complete(ds)


def test_check_complete_rounds_single_bit_data_up_to_whole_bytes() -> None:
    ds = image_dataset(rows=3, columns=3, bits=1, pixel_bytes=2)  # 9 bits
    dicomio.check_complete(ds)
    ds.PixelData = b"\x00"
    with pytest.raises(IncompleteError):
        dicomio.check_complete(ds)


def test_check_complete_knows_ybr_full_422_is_subsampled() -> None:
    dicomio.check_complete(load(sample("SC_ybr_full_422_uncompressed.dcm")))


@pytest.mark.parametrize("missing", ["Rows", "Columns", "BitsAllocated"])
def test_pixel_data_without_its_geometry_is_not_usable_dicom(missing: str) -> None:
    ds = image_dataset()
    delattr(ds, missing)
    with pytest.raises(NotDicomError, match=missing):
        dicomio.check_complete(ds)


def test_image_attributes_without_pixel_data_are_incomplete() -> None:
    ds = image_dataset()
    del ds.PixelData
    with pytest.raises(IncompleteError, match="no pixel data"):
        dicomio.check_complete(ds)


def test_image_storage_instance_without_pixel_data_is_incomplete() -> None:
    ds = minimal_dataset(SOPClassUID=CT_STORAGE)
    with pytest.raises(IncompleteError, match="CT Image Storage"):
        dicomio.check_complete(ds)
    dicomio.check_complete(minimal_dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11"))  # SR


def test_float_pixel_data_is_checked_too() -> None:
    ds = image_dataset(bits=32)
    del ds.PixelData
    ds.FloatPixelData = bytes(4 * 4 * 4 - 4)
    with pytest.raises(IncompleteError):
        dicomio.check_complete(ds)


def _encapsulated(items: list[bytes], frames: int = 1) -> Dataset:
    ds = with_syntax(image_dataset(frames=frames), JPEGBaseline8Bit)
    value = b"".join(b"\xfe\xff\x00\xe0" + struct.pack("<L", len(i)) + i for i in items)
    ds.PixelData = value
    ds["PixelData"].is_undefined_length = True
    return ds


def test_well_formed_encapsulated_pixel_data_is_complete() -> None:
    dicomio.check_complete(_encapsulated([b"", b"\xff\xd8ab", b"cd"]))
    dicomio.check_complete(_encapsulated([struct.pack("<2L", 0, 12), b"\xff\xd8ab", b"cd"], 2))
    ds = with_syntax(image_dataset(frames=2), RLELossless)
    ds.PixelData = encapsulate([b"a" * 10, b"b" * 10])
    dicomio.check_complete(ds)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"", IncompleteError),  # no Basic Offset Table
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00", IncompleteError),  # no fragment
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x10\x00\x00\x00abc", IncompleteError),
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x04", IncompleteError),
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00\x08\x00\x18\x00\x02\x00\x00\x00ab", DecodeError),
        (b"\xfe\xff\x00\xe0\x02\x00\x00\x00ab\xfe\xff\x00\xe0\x02\x00\x00\x00ab", DecodeError),
        (
            b"\xfe\xff\x00\xe0\x04\x00\x00\x00\x00\x01\x00\x00\xfe\xff\x00\xe0\x02\x00\x00\x00ab",
            IncompleteError,
        ),  # offset table points past the end
    ],
)
def test_malformed_encapsulated_pixel_data_is_refused(value: bytes, error: type[Exception]) -> None:
    ds = _encapsulated([])
    ds.PixelData = value
    with pytest.raises(error):
        dicomio.check_complete(ds)


def test_fewer_fragments_than_frames_is_incomplete() -> None:
    with pytest.raises(IncompleteError, match="3 frames"):
        dicomio.check_complete(_encapsulated([b"", b"\xff\xd8ab", b"cd"], frames=3))


def test_a_trailing_sequence_delimiter_item_is_accepted() -> None:
    ds = _encapsulated([b"", b"\xff\xd8ab"])
    ds.PixelData = ds.PixelData + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    dicomio.check_complete(ds)


# --------------------------------------------------------------------------- header values


def _round_trip(ds: Dataset) -> Dataset:
    return dicomio.parse(dicomio.encode(ds))


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Hans"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ],
)
def test_header_values_decode_the_declared_character_set(charset: object, name: str) -> None:
    ds = _round_trip(minimal_dataset(SpecificCharacterSet=charset, PatientName=name))
    assert dicomio.header_values(ds, ["PatientName"]) == {"PatientName": name}


def test_latin1_text_is_stored_as_latin1() -> None:
    data = dicomio.encode(minimal_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Müller"))
    assert b"M\xfcller" in data


def test_bytes_invalid_for_the_charset_become_replacement_characters() -> None:
    data = dicomio.encode(
        minimal_dataset(SpecificCharacterSet="ISO_IR 192", PatientName="Mxller^Hans")
    )
    ds = dicomio.parse(data.replace(b"Mxller", b"M\xfcller"))  # not UTF-8
    assert dicomio.header_values(ds, ["PatientName"])["PatientName"] == "M\ufffdller^Hans"


def test_an_unknown_character_set_does_not_raise() -> None:
    data = dicomio.encode(minimal_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Ab"))
    ds = dicomio.parse(data.replace(b"ISO_IR 100", b"ISO_IR 999"))
    assert dicomio.header_values(ds, ["PatientName"])["PatientName"] == "Ab"


def test_header_values_of_every_kind() -> None:
    source = minimal_dataset(
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        PatientName="Doe^John",
        StudyDescription="",
        InstanceNumber="7",
        SliceThickness="1.50",
        Rows=64,
        ReferencedImageSequence=Sequence([Dataset()]),
    )
    ds = _round_trip(source)
    keywords = [
        "ImageType",
        "PatientName",
        "StudyDescription",
        "InstanceNumber",
        "SliceThickness",
        "Rows",
        "ReferencedImageSequence",
        "AccessionNumber",
        "NotAKeyword",
    ]
    assert dicomio.header_values(ds, keywords) == {
        "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
        "PatientName": "Doe^John",
        "StudyDescription": None,  # empty
        "InstanceNumber": "7",
        "SliceThickness": "1.50",  # as written
        "Rows": "64",
        "ReferencedImageSequence": None,
        "AccessionNumber": None,  # absent
        "NotAKeyword": None,
    }


def test_header_values_of_binary_values_are_none() -> None:
    ds = load(sample("MR_small.dcm"))
    assert dicomio.header_values(ds, ["PixelData"]) == {"PixelData": None}


def test_header_values_never_raise_on_hostile_values() -> None:
    ds = Dataset()
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", 1, b"\x01", 0, False, True)
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 4, b"abc ", 0, False, True)
    values = dicomio.header_values(ds, ["Rows", "InstanceNumber"])
    assert values == {"Rows": None, "InstanceNumber": "abc"}


# --------------------------------------------------------------------------- plain and syntax


def test_plain_explicit_le_file_can_be_archived_as_is() -> None:
    assert dicomio.is_plain_explicit_le(load(sample("CT_small.dcm")))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "JPEG2000.dcm",
        "ExplVR_LitEndNoMeta.dcm",
    ],
)
def test_other_encodings_are_not_plain(name: str) -> None:
    assert not dicomio.is_plain_explicit_le(load(sample(name)))


def test_file_meta_naming_another_instance_is_not_plain() -> None:
    ds = load(sample("CT_small.dcm"))
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    assert not dicomio.is_plain_explicit_le(ds)


def test_dataset_built_in_memory_is_not_plain() -> None:
    ds = with_syntax(image_dataset(), ExplicitVRLittleEndian)
    assert not dicomio.is_plain_explicit_le(ds)
    assert dicomio.transfer_syntax(ds) == ExplicitVRLittleEndian
    assert dicomio.transfer_syntax(Dataset()) == ImplicitVRLittleEndian


# --------------------------------------------------------------------------- encode


def _meta_and_body(data: bytes) -> tuple[Dataset, bytes]:
    ds = dcmread(io.BytesIO(data), force=False)
    return ds.file_meta, data[meta_end(data) :]


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan.dcm"]
)
def test_encode_is_deterministic(name: str) -> None:
    ds = load(sample(name))
    assert dicomio.encode(ds) == dicomio.encode(ds)
    assert dicomio.encode(ds) == dicomio.encode(load(sample(name)))


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",
        "ExplVR_LitEndNoMeta.dcm",
        "ExplVR_BigEndNoMeta.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_encode_writes_a_proper_dicom_file(name: str) -> None:
    source = load(sample(name))
    data = dicomio.encode(source)
    assert data[:132] == bytes(128) + b"DICM"
    meta, _ = _meta_and_body(data)  # readable without force
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == source.SOPClassUID
    assert meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    back = load(data)
    assert dicomio.is_plain_explicit_le(back)
    assert back.SOPInstanceUID == source.SOPInstanceUID
    assert sorted(back.keys()) == sorted(source.keys())


def test_encode_of_a_file_without_meta() -> None:
    data = sample("CT_small.dcm")
    out = dicomio.encode(load(data[meta_end(data) :]))
    back = dcmread(io.BytesIO(out), force=False)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(back.pixel_array, reference_pixels(data))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",  # 16-bit
        "rtdose_expb.dcm",  # 32-bit, multi-frame
        "SC_rgb_small_odd_big_endian.dcm",  # 8-bit RGB, odd length
        "MR_small_implicit.dcm",
        "CT_small.dcm",
    ],
)
def test_encode_keeps_the_pixels(name: str) -> None:
    data = sample(name)
    back = dcmread(io.BytesIO(dicomio.encode(load(data))), force=False)
    assert np.array_equal(back.pixel_array, reference_pixels(data))


def test_encode_converts_big_endian_numbers_and_keeps_the_input() -> None:
    data = sample("MR_small_bigendian.dcm")
    ds = load(data)
    before = ds.PixelData
    back = dicomio.parse(dicomio.encode(ds))
    assert ds.PixelData == before  # the input's values were not swapped in place
    for keyword in ("Rows", "Columns", "BitsAllocated", "PatientName", "SliceThickness"):
        assert back.get(keyword) == ds.get(keyword)


def test_encode_zeroes_the_preamble() -> None:
    data = bytearray(sample("CT_small.dcm"))
    data[:4] = b"MZ\x90\x00"  # an executable header hiding in the preamble
    out = dicomio.encode(load(bytes(data)))
    assert out[:128] == bytes(128)


def test_encode_refuses_compressed_pixel_data() -> None:
    with pytest.raises(EncodeError, match="compressed"):
        dicomio.encode(load(sample("JPEG2000.dcm")))


def test_encode_needs_sop_class_and_instance() -> None:
    with pytest.raises(EncodeError):
        dicomio.encode(minimal_dataset(SOPClassUID=None))


def test_encode_wraps_values_pydicom_cannot_write() -> None:
    ds = minimal_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00280010, "US", 70000)  # does not fit in 16 bits
    with pytest.raises(EncodeError):
        dicomio.encode(ds)


def test_encode_drops_file_meta_elements_stranded_in_the_data_set() -> None:
    ds = minimal_dataset()
    ds.add_new(0x00020016, "AE", "STRAY")
    back = dcmread(io.BytesIO(dicomio.encode(ds)), force=False)
    assert 0x00020016 not in back
    assert "SourceApplicationEntityTitle" not in back.file_meta


# Elements decompress() may change; everything else must come out as it went in.
_CHANGED_BY_DECODING = {0x00280004, 0x00280006, 0x00282110, 0x00282114, 0x7FE00010}


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "image_dfl.dcm"]
)
def test_encode_copies_every_unchanged_element_byte_for_byte(name: str) -> None:
    """Explicit VR Little Endian sources (compressed ones too): the raw bytes survive."""
    data = sample(name)
    ds = load(data)
    decode.decompress(ds)
    source, back = reference(data), reference(dicomio.encode(ds))
    assert set(back.keys()) - _CHANGED_BY_DECODING == set(source.keys()) - _CHANGED_BY_DECODING
    for tag in list(source.keys()):
        if tag in _CHANGED_BY_DECODING:
            continue
        before, after = source.get_item(tag), back.get_item(tag)
        if before.VR == "SQ":
            assert source[tag].value == back[tag].value, Tag(tag)
        else:
            assert (after.VR, after.value) == (before.VR, before.value), Tag(tag)


@pytest.mark.parametrize(
    ("instance_uid", "ae_title"),
    [
        ("1.2.826.0.1.3680043.8.498.99", None),
        ("1.2.826.0.1.3680043.8.498.9", "MODALITY1"),
        ("1.2.3", "ODD"),
    ],
)
def test_encoded_file_meta_is_what_pydicom_writes(instance_uid: str, ae_title: str | None) -> None:
    ds = minimal_dataset(SOPInstanceUID=instance_uid)
    ds.file_meta = FileMetaDataset()
    if ae_title is not None:
        ds.file_meta.SourceApplicationEntityTitle = ae_title
    out = dicomio.encode(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SC_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if ae_title is not None:
        meta.SourceApplicationEntityTitle = ae_title
    expected = DicomBytesIO()
    write_file_meta_info(expected, meta, enforce_standard=True)
    assert out[132 : meta_end(out)] == expected.getvalue()


def test_encode_refuses_a_uid_that_iso_8859_1_cannot_hold() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the value it is given
        ds = minimal_dataset(SOPInstanceUID="1.2.3\u4e2d")
    with pytest.raises(EncodeError, match="cannot be encoded"):
        dicomio.encode(ds)


@pytest.mark.parametrize(
    ("title", "written"),
    [("\u00c9CHO", b"\xc9CHO"), (["A", "B"], b"A\\B "), ("\u4e2d\u6587", None)],
    ids=["latin-1", "two-values", "not-encodable"],
)
def test_source_ae_title_is_written_as_pydicom_does_or_left_out(
    title: str | list[str], written: bytes | None
) -> None:
    ds = load(sample("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about values outside the AE VR
        ds.file_meta.SourceApplicationEntityTitle = title
    out = dicomio.encode(ds)
    meta = out[132 : meta_end(out)]
    tag = b"\x02\x00\x16\x00AE"
    if written is None:
        assert tag not in meta
    else:
        assert tag + struct.pack("<H", len(written)) + written in meta


@pytest.mark.parametrize("vr", [b"C\x00", b"QQ"], ids=["not-letters", "letters"])
@pytest.mark.parametrize("where", ["in-order", "after-sop-class"])
def test_parse_refuses_an_unknown_vr_in_an_element_it_does_not_read(vr: bytes, where: str) -> None:
    """Written back first in its data set, VR bytes that are not letters make a reader
    take the whole data set for implicit VR; an unknown VR is never archived."""
    data = _with_raw_element(0x00070001, "CS", b"\x01")
    head = data.index(b"\x07\x00\x01\x00CS")
    element = data[head : head + 4] + vr + data[head + 6 : head + 9]
    rest = data[:head] + data[head + 9 :]
    if where == "in-order":
        patched = rest[:head] + element + rest[head:]
    else:  # out of tag order, behind (0008,0016), so the data set still reads as explicit
        sop_class = rest.index(b"\x08\x00\x16\x00UI")
        (length,) = struct.unpack_from("<H", rest, sop_class + 6)
        after = sop_class + 8 + length
        patched = rest[:after] + element + rest[after:]
    with pytest.raises(NotDicomError) as raised:
        dicomio.parse(patched)
    if where == "after-sop-class":
        assert "(0007,0001) cannot be decoded" in str(raised.value)


def test_read_back_compares_encoding_and_elements_with_what_was_written() -> None:
    ds = load(sample("CT_small.dcm"))
    data = dicomio.encode(ds)
    written = dicomio._shallow_copy(ds)
    dicomio._check_reads_back(data, frozenset(), expect=written)
    written.add_new(0x00091099, "LO", "never written")
    with pytest.raises(EncodeError, match="other elements"):
        dicomio._check_reads_back(data, frozenset(), expect=written)


def test_read_back_is_needed_only_for_elements_the_reader_guessed() -> None:
    for clean in (sample("CT_small.dcm"), sample("JPEG2000.dcm"), sample("rtplan.dcm")):
        assert not dicomio._rewrites_structure(load(clean), top_level=True)
    unknown = load(_with_raw_element(0x0018FFF0, "UN", b"abcd"))
    assert dicomio._rewrites_structure(unknown, top_level=True)
    undefined = load(_with_raw_element(0x0018FFF0, "OB", b"abcd", length=0xFFFFFFFF))
    assert dicomio._rewrites_structure(undefined, top_level=True)


def test_encode_keeps_the_source_ae_title() -> None:
    ds = load(sample("CT_small.dcm"))
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"
    back = dcmread(io.BytesIO(dicomio.encode(ds)), force=False)
    assert back.file_meta.SourceApplicationEntityTitle == "MODALITY1"


# --------------------------------------------------------------------------- deflate bomb


def _deflated_file(rows: int, columns: int) -> tuple[bytes, int]:
    """A Deflated Explicit VR LE file of zero pixels, and the size it inflates to."""
    ds = image_dataset(rows=rows, columns=columns)
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True)
    inflated = body.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    empty = Dataset()
    empty.file_meta = meta
    empty.preamble = bytes(128)
    empty.SOPClassUID = ds.SOPClassUID
    empty.SOPInstanceUID = ds.SOPInstanceUID
    empty.save_as(head, enforce_file_format=True)
    prefix = head.getvalue()[: meta_end(head.getvalue())]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(inflated) + compressor.flush()
    return prefix + deflated + b"\x00" * (len(deflated) % 2), len(inflated)


def test_deflated_data_set_inflating_past_the_limit_is_refused() -> None:
    data, inflated = _deflated_file(2000, 2000)
    assert len(data) < 20_000  # a small file...
    with pytest.raises(TooLargeError):  # ...that would take 8 MB
        dicomio.parse(data, max_inflated_bytes=1_000_000)
    with pytest.raises(TooLargeError):
        dicomio.parse(data, max_inflated_bytes=inflated - 1)
    ds = dicomio.parse(data, max_inflated_bytes=inflated)
    assert len(ds.PixelData) == 8_000_000
