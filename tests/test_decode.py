"""decode: codec report, size guard against decompression bombs, decompression.

The hostile codestreams here are never decoded: a test that decoded a 60000 x 60000
JPEG 2000 header would take minutes and tens of GB.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomwatch import decode, dicomio
from dicomwatch.errors import DecodeError, NotDicomError, TooLargeError

LOSSLESS = [
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_RLE.dcm",  # RLE
    "SC_rgb_rle_2frame.dcm",  # RLE, colour, multi-frame
    "rtdose_rle.dcm",  # RLE, 32-bit, 15 frames
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless process 14 SV1 (4.70)
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless, YBR_RCT
    "examples_jpeg2k.dcm",  # JPEG 2000 lossless, 3 frames
]

# name -> Lossy Image Compression Method expected after decoding
LOSSY = {
    "JPEG2000.dcm": "ISO_15444_1",  # JPEG 2000 (4.91); method absent in the file
    "JPEGLSNearLossless_16.dcm": "ISO_14495_1",  # no lossy tags in the file at all
    "JPEGLSNearLossless_08.dcm": "ISO_14495_1",
    "JPGExtended.dcm": "ISO_10918_1",
    "SC_rgb_jpeg_dcmtk.dcm": "ISO_10918_1",  # YBR_FULL
    "SC_jpeg_no_color_transform.dcm": "ISO_10918_1",
    "SC_rgb_jpeg.dcm": "ISO_10918_1",
    "SC_rgb_jpeg_lossy_gdcm.dcm": "ISO_10918_1",  # ratio present, method absent
    "examples_ybr_color.dcm": "ISO_10918_1",  # YBR_FULL_422, 30 frames
}

COMPRESSED = [*LOSSLESS, *LOSSY, "JPEG-lossy.dcm", "SC_rgb_small_odd_jpeg.dcm", "693_J2KI.dcm"]


def sample(name: str) -> bytes:
    """Bytes of a pydicom test file; skip (never download) if this pydicom lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(path)).read_bytes()


def reference_pixels(data: bytes) -> np.ndarray:
    """The pixels as plain pydicom decodes them (YCbCr converted to RGB, its default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=True).pixel_array


def load(data: bytes) -> Dataset:
    ds = dicomio.parse(data)
    dicomio.check_complete(ds)
    return ds


def patched(data: bytes, marker: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """`data` with `values` packed at `offset` bytes after the first `marker`."""
    at = data.index(marker) + offset
    size = struct.calcsize(fmt)
    return data[:at] + struct.pack(fmt, *values) + data[at + size :]


def encapsulated_dataset(
    fragments: list[bytes], syntax: str, *, rows: int, columns: int, samples: int = 1
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"".join(
        b"\xfe\xff\x00\xe0" + struct.pack("<L", len(f)) + f for f in fragments
    )
    ds.PixelData = items
    ds["PixelData"].is_undefined_length = True
    return ds


def first_fragment(name: str) -> bytes:
    ds = load(sample(name))
    return bytes(dicomio.encapsulated_fragments(ds.PixelData)[0])


# --------------------------------------------------------------------------- codec report


def test_codec_report_covers_every_compressed_syntax() -> None:
    report = decode.codec_report()
    assert report["JPEG 2000 Image Compression (Lossless Only) 1.2.840.10008.1.2.4.90"] is True
    assert report["JPEG Baseline (Process 1) 1.2.840.10008.1.2.4.50"] is True
    assert report["JPEG-LS Lossless Image Compression 1.2.840.10008.1.2.4.80"] is True
    assert report["RLE Lossless 1.2.840.10008.1.2.5"] is True
    assert report["MPEG2 Main Profile / Main Level 1.2.840.10008.1.2.4.100"] is False
    assert not any(key.endswith((" 1.2.840.10008.1.2", " 1.2.840.10008.1.2.1")) for key in report)
    assert all(isinstance(value, bool) for value in report.values())


# --------------------------------------------------------------------------- is_compressed


def test_is_compressed() -> None:
    assert decode.is_compressed(load(sample("JPEG2000.dcm")))
    assert decode.is_compressed(load(sample("MR_small_RLE.dcm")))
    assert not decode.is_compressed(load(sample("CT_small.dcm")))
    assert not decode.is_compressed(load(sample("MR_small_bigendian.dcm")))


def test_compressed_syntax_without_pixel_data_is_not_compressed() -> None:
    ds = encapsulated_dataset([b"x"], JPEGBaseline8Bit, rows=1, columns=1)
    del ds.PixelData
    assert not decode.is_compressed(ds)
    assert decode.decompress(ds) is ds


# --------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_round_trip_keeps_every_pixel(name: str) -> None:
    data = sample(name)
    expected = reference_pixels(data)
    ds = load(data)
    uid = ds.SOPInstanceUID
    decode.check_size(ds, decode.declared_decoded_bytes(ds))
    decode.decompress(ds)
    back = load(dicomio.encode(ds))
    assert np.array_equal(back.pixel_array, expected)
    assert back.SOPInstanceUID == uid
    assert back.file_meta.MediaStorageSOPInstanceUID == uid
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not decode.is_compressed(back)
    declared = decode.declared_decoded_bytes(back)
    assert len(back.PixelData) == declared + declared % 2
    assert back.get("LossyImageCompression") in (None, "00")


def test_rle_and_native_copies_of_one_image_decode_alike() -> None:
    rle = decode.decompress(load(sample("MR_small_RLE.dcm")))
    native = load(sample("MR_small.dcm"))
    assert np.array_equal(rle.pixel_array, native.pixel_array)


def test_jpeg2000_colour_transform_is_undone() -> None:
    ds = load(sample("GDCMJ2K_TextGBR.dcm"))
    assert ds.PhotometricInterpretation == "YBR_RCT"
    decode.decompress(ds)
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.PlanarConfiguration == 0


# --------------------------------------------------------------------------- lossy


@pytest.mark.parametrize(("name", "method"), LOSSY.items())
def test_lossy_source_is_marked_lossy(name: str, method: str) -> None:
    data = sample(name)
    source = load(data)
    had_method = source.get("LossyImageCompressionMethod")
    had_ratio = source.get("LossyImageCompressionRatio")
    uid = source.SOPInstanceUID
    decode.decompress(source)
    back = load(dicomio.encode(source))
    assert back.LossyImageCompression == "01"
    assert back.LossyImageCompressionMethod == (had_method or method)
    assert back.get("LossyImageCompressionRatio") == had_ratio
    assert back.SOPInstanceUID == uid
    assert np.array_equal(back.pixel_array, reference_pixels(data))
    if back.SamplesPerPixel == 3:
        assert back.PhotometricInterpretation == "RGB"
        assert back.PlanarConfiguration == 0


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm"])
def test_ycbcr_jpeg_keeps_its_identity(name: str) -> None:
    ds = load(sample(name))
    uid = ds.SOPInstanceUID
    assert ds.PhotometricInterpretation.startswith("YBR_FULL")
    decode.decompress(ds)
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.SOPInstanceUID == uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid


def test_pydicom_default_would_mint_a_new_uid() -> None:
    """Why decompress() passes generate_instance_uid=False."""
    ds = load(sample("SC_rgb_jpeg_dcmtk.dcm"))
    uid = ds.SOPInstanceUID
    ds.decompress()
    assert ds.SOPInstanceUID != uid


def test_existing_lossy_method_is_kept() -> None:
    ds = load(sample("SC_rgb_jpeg_dcmtk.dcm"))
    ds.LossyImageCompressionMethod = ["ISO_15444_1", "ISO_10918_1"]  # compressed twice
    decode.decompress(ds)
    assert list(ds.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]


def test_decoded_file_is_not_archived_as_is() -> None:
    ds = load(sample("JPEG2000.dcm"))
    decode.decompress(ds)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not dicomio.is_plain_explicit_le(ds)  # its bytes on disk are still JPEG 2000


# --------------------------------------------------------------------------- decode errors


def test_jpeg_lossy_test_file_is_a_decode_error() -> None:
    # libjpeg refuses this file ("misplaced marker segment"); only GDCM decodes it.
    with pytest.raises(DecodeError) as caught:
        decode.decompress(load(sample("JPEG-lossy.dcm")))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_corrupt_codestream_is_a_decode_error() -> None:
    fragment = first_fragment("MR_small_jp2klossless.dcm")
    ds = encapsulated_dataset(
        [fragment[:60] + bytes(len(fragment) - 60)], JPEG2000Lossless, rows=64, columns=64
    )
    decode.check_size(ds, 1 << 20)
    with pytest.raises(DecodeError):
        decode.decompress(ds)


def test_syntax_without_decoder_is_a_decode_error() -> None:
    fragment = first_fragment("MR_small_jp2klossless.dcm")
    ds = encapsulated_dataset([fragment], JPEG2000MCLossless, rows=64, columns=64)
    with pytest.raises(DecodeError) as caught:
        decode.decompress(ds)
    assert isinstance(caught.value.__cause__, NotImplementedError)


def test_native_data_is_left_alone() -> None:
    ds = load(sample("CT_small.dcm"))
    before = ds.PixelData
    assert decode.decompress(ds) is ds
    assert ds.PixelData == before


# --------------------------------------------------------------------------- declared size


def test_declared_decoded_bytes() -> None:
    assert decode.declared_decoded_bytes(load(sample("MR_small.dcm"))) == 64 * 64 * 2
    assert decode.declared_decoded_bytes(load(sample("SC_rgb_rle_2frame.dcm"))) == 100 * 100 * 3 * 2
    assert decode.declared_decoded_bytes(load(sample("rtplan.dcm"))) == 0  # no pixel data


def test_declared_size_needs_the_pixel_geometry() -> None:
    ds = encapsulated_dataset([b"x"], JPEGBaseline8Bit, rows=1, columns=1)
    del ds.Columns
    with pytest.raises(NotDicomError, match="Columns"):
        decode.declared_decoded_bytes(ds)


@pytest.mark.parametrize("name", ["MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm"])
def test_limit_is_respected_exactly_at_the_boundary(name: str) -> None:
    ds = load(sample(name))
    declared = decode.declared_decoded_bytes(ds)
    decode.check_size(ds, declared)
    with pytest.raises(TooLargeError, match=str(declared)):
        decode.check_size(ds, declared - 1)


@pytest.mark.parametrize("syntax", [JPEG2000, ExplicitVRLittleEndian])
def test_huge_header_over_a_few_bytes_is_refused_at_once(syntax: str) -> None:
    ds = encapsulated_dataset([b"\xff\x4f\xff\x51"], syntax, rows=65535, columns=65535)
    ds.NumberOfFrames = 1000
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = b"\x00" * 16
        ds["PixelData"].is_undefined_length = False
    started = time.perf_counter()
    with pytest.raises(TooLargeError):
        decode.check_size(ds, 2 * 1024**3)
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------- codestream headers


@pytest.mark.parametrize("name", [n for n in COMPRESSED if "RLE" not in n and "rle" not in n])
def test_codestream_dimensions_match_the_header_of_every_test_file(name: str) -> None:
    ds = load(sample(name))
    expected = (ds.Rows, ds.Columns, ds.SamplesPerPixel)
    for fragment in dicomio.encapsulated_fragments(ds.PixelData):
        dims = decode.codestream_dimensions(bytes(fragment))
        if dims is not None:
            assert dims == expected


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"])
def test_rle_has_no_codestream_header(name: str) -> None:
    assert decode.codestream_dimensions(first_fragment(name)) is None
    decode.check_size(load(sample(name)), 10**9)


def _assert_refused_quickly(data: bytes, *numbers: int) -> None:
    ds = load(data)  # the file is structurally sound...
    started = time.perf_counter()
    with pytest.raises(TooLargeError) as caught:
        decode.check_size(ds, 10**9)  # ...and the header alone is within the limit
    assert time.perf_counter() - started < 0.5
    for number in numbers:
        assert str(number) in str(caught.value)


def test_jpeg2000_siz_larger_than_the_header_is_refused_without_decoding() -> None:
    data = sample("JPEG2000.dcm")
    # SIZ: FF51, Lsiz, Rsiz, then Xsiz and Ysiz
    bomb = patched(data, b"\xff\x4f\xff\x51", 8, ">2L", 60000, 60000)
    assert decode.codestream_dimensions(
        bytes(dicomio.encapsulated_fragments(load(bomb).PixelData)[0])
    ) == (60000, 60000, 1)
    _assert_refused_quickly(bomb, 60000, 1024)


def test_jpeg2000_extra_components_are_refused() -> None:
    data = sample("MR_small_jp2klossless.dcm")
    _assert_refused_quickly(patched(data, b"\xff\x4f\xff\x51", 40, ">H", 4), 4)


def test_pydicom_test_file_with_a_damaged_siz_is_refused() -> None:
    # Its SIZ was overwritten with a sequence delimiter: 3722445056 columns.
    _assert_refused_quickly(sample("JPEG2000-embedded-sequence-delimiter.dcm"), 3722445056)


def _jp2(codestream: bytes) -> bytes:
    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">L", 8 + len(body)) + kind + body

    ihdr = box(b"ihdr", struct.pack(">LLHBBBB", 64, 64, 1, 15, 7, 0, 0))
    return (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + box(b"jp2h", ihdr)
        + box(b"jp2c", codestream)
    )


def test_jp2_file_format_is_read_through_its_boxes() -> None:
    codestream = first_fragment("MR_small_jp2klossless.dcm")
    assert decode.codestream_dimensions(_jp2(codestream)) == (64, 64, 1)
    bomb = patched(codestream, b"\xff\x4f\xff\x51", 8, ">2L", 60000, 60000)
    ds = encapsulated_dataset([_jp2(bomb)], JPEG2000Lossless, rows=64, columns=64)
    with pytest.raises(TooLargeError):
        decode.check_size(ds, 10**9)


def test_jp2_box_lengths_are_honoured() -> None:
    codestream = first_fragment("MR_small_jp2klossless.dcm")
    xl_box = struct.pack(">L4sQ", 1, b"free", 16 + 4) + b"junk"  # 64-bit length
    data = _jp2(codestream)
    with_xl = data[:12] + xl_box + data[12:]
    assert decode.codestream_dimensions(with_xl) == (64, 64, 1)
    last = struct.pack(">L4s", 0, b"jp2c") + codestream  # length 0: to the end
    assert decode.codestream_dimensions(data[:12] + last) == (64, 64, 1)
    broken = data[:12] + struct.pack(">L4s", 4, b"free") + data[12:]  # shorter than a header
    assert decode.codestream_dimensions(broken) is None


def test_jpeg_sof_larger_than_the_header_is_refused() -> None:
    data = sample("SC_rgb_jpeg_dcmtk.dcm")
    # SOF0: FFC0, Lf, P, then Y and X
    _assert_refused_quickly(patched(data, b"\xff\xc0", 5, ">2H", 60000, 60000), 60000, 100)


def test_jpeg_extended_sof_is_read() -> None:
    data = sample("JPGExtended.dcm")
    _assert_refused_quickly(patched(data, b"\xff\xc1", 5, ">H", 4096), 4096)


def test_jpeg_extra_components_are_refused() -> None:
    data = sample("SC_rgb_jpeg_dcmtk.dcm")
    _assert_refused_quickly(patched(data, b"\xff\xc0", 9, ">B", 4), 4)


def test_jpeg_ls_sof55_larger_than_the_header_is_refused() -> None:
    data = sample("MR_small_jpeg_ls_lossless.dcm")
    _assert_refused_quickly(patched(data, b"\xff\xf7", 5, ">2H", 60000, 60000), 60000, 64)


def test_jpeg_lossless_sof3_is_read() -> None:
    data = sample("SC_rgb_jpeg_gdcm.dcm")
    _assert_refused_quickly(patched(data, b"\xff\xc3", 7, ">H", 30000), 30000)


def test_header_split_across_fragments_is_still_read() -> None:
    bomb = patched(first_fragment("JPEG2000.dcm"), b"\xff\x4f\xff\x51", 8, ">2L", 60000, 60000)
    for split in (1, 2, 3, 10):
        ds = encapsulated_dataset([bomb[:split], bomb[split:]], JPEG2000, rows=1024, columns=256)
        with pytest.raises(TooLargeError):
            decode.check_size(ds, 10**9)


def test_every_frame_is_checked() -> None:
    good = first_fragment("MR_small_jp2klossless.dcm")
    bomb = patched(good, b"\xff\x4f\xff\x51", 8, ">2L", 60000, 60000)
    ds = encapsulated_dataset([good, good, bomb], JPEG2000Lossless, rows=64, columns=64)
    ds.NumberOfFrames = 3
    with pytest.raises(TooLargeError, match="fragment 2"):
        decode.check_size(ds, 10**9)
    ds.PixelData = encapsulate([good, good, good])
    decode.check_size(ds, 10**9)


def test_unreadable_codestream_header_is_refused() -> None:
    ds = encapsulated_dataset([b"\x00" * 64], JPEG2000Lossless, rows=64, columns=64)
    with pytest.raises(DecodeError, match="fragment 0"):
        decode.check_size(ds, 10**9)
    ds = encapsulated_dataset([b"\xff\xd8\xff\xda"], JPEGBaseline8Bit, rows=64, columns=64)
    with pytest.raises(DecodeError):
        decode.check_size(ds, 10**9)


def test_rle_is_sized_by_the_header_alone() -> None:
    ds = encapsulated_dataset([b"\x00" * 64], RLELossless, rows=64, columns=64)
    decode.check_size(ds, 10**9)


def _sof(marker: int, rows: int, columns: int, components: int) -> bytes:
    body = struct.pack(">BHHB", 8, rows, columns, components) + b"\x01\x11\x00" * components
    return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(body)) + body


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"\xff\xd8", None),
        (b"\xff\xd8\xff\xd9", None),  # EOI before any frame
        (b"\xff\xd8\xff\xda\x00\x02", None),  # scan before any frame
        (b"\xff\xd8\xff\xe0\x00\x01", None),  # impossible segment length
        (b"\xff\xd8" + _sof(0xC0, 10, 20, 3)[:6], None),  # cut short
        (b"\xff\xd8" + _sof(0xC0, 10, 20, 3), (10, 20, 3)),
        (b"\xff\xd8" + _sof(0xC2, 10, 20, 1), (10, 20, 1)),  # progressive
        (b"\xff\xd8" + _sof(0xF7, 10, 20, 1), (10, 20, 1)),  # JPEG-LS
        (b"\xff\xd8" + _sof(0xDE, 900, 800, 1) + _sof(0xC0, 9, 8, 1), (900, 800, 1)),  # DHP
        (b"\xff\xd8\xff\xc4\x00\x03\x00" + _sof(0xC0, 1, 2, 1), (1, 2, 1)),  # DHT skipped
        (b"\xff\xd8garbage\xff\xff\xff" + _sof(0xC0, 3, 4, 1), (3, 4, 1)),  # junk, fill bytes
        (
            b"\xff\xd8" + _sof(0xC0, 0, 4, 1) + b"\xff\xda\x00\x02..\xff\xdc\x00\x04\x01\x00",
            (256, 4, 1),
        ),  # height from DNL
        (b"\xff\xd8" + _sof(0xC0, 0, 4, 1), None),  # DNL promised, never given
        (b"\xff\x4f\xff\x51\x00\x29" + bytes(36), None),  # SIZ cut short
        (
            b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">4L", 10, 10, 10, 0) + bytes(26),
            None,
        ),  # empty image area (XOsiz >= Xsiz)
        (
            b"\xff\x4f\xff\x51\x00\x29\x00\x00"
            + struct.pack(">4L", 110, 60, 10, 20)
            + bytes(16)
            + b"\x00\x03",
            (40, 100, 3),
        ),  # image area is the grid minus the offsets
        (b"RIFF....WEBP", None),
    ],
)
def test_codestream_dimensions_of_hand_built_streams(
    data: bytes, expected: tuple[int, int, int] | None
) -> None:
    assert decode.codestream_dimensions(data) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]),
    st.binary(max_size=200),
)
def test_codestream_dimensions_never_raises(prefix: bytes, rest: bytes) -> None:
    dims = decode.codestream_dimensions(prefix + rest)
    assert dims is None or all(isinstance(v, int) and v >= 0 for v in dims)


# ----- decoding into the output buffer ---------------------------------------------------

VENDOR_COMPRESSED = [
    *COMPRESSED,
    "J2K_pixelrep_mismatch.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "JPEGLSNearLossless_08.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "examples_jpeg2k.dcm",
    "rtdose_rle.dcm",
]


@pytest.mark.parametrize("name", sorted(set(VENDOR_COMPRESSED)))
def test_decoding_into_the_output_buffer_gives_the_same_file(name: str) -> None:
    """Frame by frame into one buffer: byte for byte what decompress() + encode() give."""
    data = sample(name)
    try:
        expected = dicomio.encode(decode.decompress(load(data)))
    except DecodeError:  # one the decoders cannot read: refused the same way
        with pytest.raises(DecodeError):
            decode.decompress_encoded(load(data))
        return
    got = decode.decompress_encoded(load(data))
    assert bytes(got) == expected
    assert np.array_equal(dcmread(io.BytesIO(bytes(got))).pixel_array, reference_pixels(data))
