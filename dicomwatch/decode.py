"""Decompression of encapsulated pixel data, guarded against decompression bombs.

Decoding is where a hostile file costs most: the codecs allocate what the codestream
declares, not what the DICOM header declares.  A 148 KB file whose JPEG 2000 SIZ marker
claims 60000 x 60000 pixels under Rows/Columns of 1024 makes pylibjpeg-openjpeg run
for 95 s and take 21 GB.  :func:`check_size` therefore reads the header of every
codestream (cheaply, without decoding) and refuses one that declares more than the
DICOM header, before :func:`decompress` is ever called.

Together with :mod:`dicomwatch.dicomio` this is the only module that imports pydicom.
"""

from __future__ import annotations

import logging
import struct

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from dicomwatch.dicomio import (
    encapsulated_fragments,
    encode,
    encode_around_pixels,
    has_encapsulated_pixel_data,
    pixel_geometry,
    suppress_pydicom_warnings,
    transfer_syntax,
)
from dicomwatch.errors import DecodeError, TooLargeError

log = logging.getLogger(__name__)

__all__ = [
    "check_size",
    "codec_report",
    "codestream_dimensions",
    "declared_decoded_bytes",
    "decompress",
    "decompress_encoded",
    "is_compressed",
]

# Lossy transfer syntaxes and the Lossy Image Compression Method (0028,2114) defined
# term for each (PS3.3 C.7.6.1.1.5.1).
_LOSSY_METHOD: dict[str, str] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_2",
    HTJ2K: "ISO_15444_15",
}

# Transfer syntaxes whose frames start with a codestream header we can read.
_CODESTREAM_SYNTAXES = frozenset(
    str(uid) for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes)
)

# Colour spaces the codecs convert away while decoding (JPEG's YCbCr, JPEG 2000's
# component transforms) and what the decoded data then is.  pydicom 3 already rewrites
# these; the table only repairs the tag should a decoder plugin not report it.
_DECODED_PHOTOMETRIC = {"YBR_FULL_422": "YBR_FULL", "YBR_ICT": "RGB", "YBR_RCT": "RGB"}

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# What the first bytes of a frame look like, as specific as the formats allow: SOI must
# be followed by a marker, SOC by SIZ.  A continuation fragment that happened to start
# like this would merely be checked as well (JPEG stuffs its entropy-coded data, so
# FF D8 cannot occur there; FF 4F FF 51 in JPEG 2000 packet data is a 2**-32 event).
_FRAME_START_SIGNATURES = (_JPEG_SOI + b"\xff", _J2K_SOC_SIZ, _JP2_SIGNATURE)
# Start Of Frame markers (C0-CF except DHT C4, JPG C8, DAC CC), JPEG-LS SOF55 (F7), and
# DHP (DE), whose frame header a hierarchical decoder sizes its output by.
_JPEG_FRAME_MARKERS = frozenset(
    {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)} | {0xF7, 0xDE}
)
_JPEG_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI, _JPEG_DNL = 0xDA, 0xD9, 0xDC
_MAX_JP2_BOXES = 1000


def is_compressed(ds: Dataset) -> bool:
    """True if `ds` holds encapsulated pixel data that must be decoded before use."""
    return has_encapsulated_pixel_data(ds)


def codec_report() -> dict[str, bool]:
    """Whether a decoder is installed for each compressed transfer syntax pydicom knows.

    Keys are "<name> <UID>", for one log line at start-up: an archive full of
    DecodeError is much easier to explain when the log said which codecs were missing.
    """
    report: dict[str, bool] = {}
    for uid in AllTransferSyntaxes:
        if not uid.is_compressed:
            continue
        try:
            available = bool(get_decoder(uid).is_available)
        except NotImplementedError:  # pydicom has no decoder at all (MPEG, HEVC, ...)
            available = False
        report[f"{uid.name} {uid}"] = available
    return report


def declared_decoded_bytes(ds: Dataset) -> int:
    """Bytes the pixel data decodes to according to the header; 0 without pixel data.

    Rows x Columns x Samples per Pixel x Frames x Bits Allocated / 8.  Raises
    NotDicomError if pixel data is present without Rows, Columns or Bits Allocated.
    """
    if not any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
        return 0
    return pixel_geometry(ds).decoded_bytes


def check_size(ds: Dataset, max_decoded_bytes: int) -> None:
    """Refuse pixel data that would decode to more than `max_decoded_bytes`, before decoding.

    Checks the header's declared size, then the codestream header of every frame
    (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, also inside JP2 boxes): a codestream that
    declares more rows, columns or components than the DICOM header is refused, since
    the codec would allocate what the codestream says.  A frame whose codestream header
    cannot be read is refused too (DecodeError): the check must not be bypassed by
    hiding the header from it.

    Raises:
        TooLargeError: too large, or a codestream larger than the header.
        DecodeError: a codestream header that cannot be read.
        IncompleteError, NotDicomError: as for dicomio.check_complete.
    """
    declared = declared_decoded_bytes(ds)
    if declared > max_decoded_bytes:
        raise TooLargeError(
            f"pixel data would decode to {declared} bytes, more than the limit of "
            f"{max_decoded_bytes}"
        )
    if not is_compressed(ds) or transfer_syntax(ds) not in _CODESTREAM_SYNTAXES:
        return  # native data, RLE (sized by the header alone), or no decoder anyway
    geometry = pixel_geometry(ds)
    limits = (geometry.rows, geometry.columns, geometry.samples_per_pixel)
    fragments = encapsulated_fragments(ds.PixelData)
    stream = b"".join(fragments)
    offset = 0
    for index, fragment in enumerate(fragments):
        # A frame starts at a fragment boundary, but its header may run on into the next
        # fragment, so the header is read from the joined stream.
        if index == 0 or stream.startswith(_FRAME_START_SIGNATURES, offset):
            dims = _dimensions_at(stream, offset)
            if dims is None:
                raise DecodeError(f"unreadable codestream header in fragment {index}")
            if any(got > limit for got, limit in zip(dims, limits, strict=True)):
                raise TooLargeError(
                    "codestream in fragment {} declares {}x{}x{} (rows x columns x "
                    "components) but the header declares {}x{}x{}".format(index, *dims, *limits)
                )
        offset += len(fragment)


def codestream_dimensions(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) declared by the codestream at the start of `fragment`.

    Understands JPEG (any SOFn, and DHP), JPEG-LS (SOF55), a JPEG 2000 codestream
    (SOC then SIZ; the image area, reference grid minus offsets) and the JP2 file
    format (the SIZ of its ``jp2c`` box).  Only marker segment headers are parsed, never
    entropy-coded data (which a JPEG frame of height 0 is merely searched for its DNL
    marker), so nothing is decoded.  None if the data starts with none of these or its
    header is malformed or cut short.
    """
    return _dimensions_at(bytes(fragment), 0)


def _dimensions_at(data: bytes, start: int) -> tuple[int, int, int] | None:
    try:
        if data.startswith(_J2K_SOC_SIZ, start):
            return _j2k_dimensions(data, start)
        if data.startswith(_JP2_SIGNATURE, start):
            return _jp2_dimensions(data, start)
        if data.startswith(_JPEG_SOI, start):
            return _jpeg_dimensions(data, start + 2)
    except struct.error:  # header cut short
        return None
    return None


def _j2k_dimensions(data: bytes, start: int) -> tuple[int, int, int] | None:
    # SOC, SIZ marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, 4 tile fields, Csiz
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4L", data, start + 8)
    (components,) = struct.unpack_from(">H", data, start + 40)
    if xosiz >= xsiz or yosiz >= ysiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, components


def _jp2_dimensions(data: bytes, start: int) -> tuple[int, int, int] | None:
    pos = start
    for _ in range(_MAX_JP2_BOXES):
        if pos + 8 > len(data):
            return None
        length, box_type = struct.unpack_from(">L4s", data, pos)
        header = 8
        if length == 1:  # 64-bit XLBox follows
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:  # box runs to the end of the data
            length = len(data) - pos
        if box_type == b"jp2c":
            body = pos + header
            return _j2k_dimensions(data, body) if data.startswith(_J2K_SOC_SIZ, body) else None
        if length < header:
            return None
        pos += length
    return None


def _jpeg_dimensions(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """Walk JPEG marker segments from `pos` (after SOI) to the first frame header."""
    end = len(data)
    while pos < end:
        if data[pos] != 0xFF:
            # Garbage between segments: decoders skip to the next marker, so do we.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            return None  # a scan or the end before any frame header
        (length,) = struct.unpack_from(">H", data, pos)
        if marker in _JPEG_FRAME_MARKERS:
            # Lf, P, Y, X, Nf
            rows, columns, components = struct.unpack_from(">HHB", data, pos + 3)
            if rows == 0:  # height given by a DNL marker after the first scan
                rows = _jpeg_dnl_rows(data, pos + length)
                if rows is None:
                    return None
            return rows, columns, components
        if length < 2:
            return None
        pos += length
    return None


def _jpeg_dnl_rows(data: bytes, pos: int) -> int | None:
    found = data.find(bytes((0xFF, _JPEG_DNL)), pos)
    if found < 0:
        return None
    (rows,) = struct.unpack_from(">H", data, found + 4)
    return int(rows) or None


def decompress(ds: Dataset) -> Dataset:
    """Decode `ds`'s pixel data in place and return it; a no-op for native pixel data.

    Call :func:`check_size` first: decoding trusts the codestream.

    The SOP Instance UID is kept (pydicom would otherwise mint a new one when it
    converts YCbCr to RGB, breaking duplicate detection and every reference to the
    instance).  Afterwards the transfer syntax is Explicit VR Little Endian, the
    Photometric Interpretation and Planar Configuration describe the decoded data
    (pydicom 3 sets both; YBR_FULL_422, YBR_ICT and YBR_RCT come out as RGB), and a
    lossy source is marked: Lossy Image Compression "01" and, if absent, the Lossy
    Image Compression Method of the transfer syntax (pydicom sets neither).

    Raises:
        DecodeError: no decoder, or the decoder failed.  MemoryError is not wrapped: it
            says nothing about the file.
    """
    if not is_compressed(ds):
        return ds
    syntax = transfer_syntax(ds)
    instance_uid = ds.get("SOPInstanceUID")
    with suppress_pydicom_warnings():
        try:
            ds.decompress(generate_instance_uid=False)
        except (MemoryError, KeyboardInterrupt, SystemExit):
            raise
        # Hostile data into third-party codecs: besides the documented AttributeError,
        # ValueError, RuntimeError and NotImplementedError they raise KeyError,
        # IndexError, TypeError, struct.error, ...  The Rust codecs (pylibjpeg-rle)
        # panic on some corrupt frames with pyo3's PanicException, a BaseException.
        except BaseException as exc:
            raise DecodeError(
                f"cannot decode {UID(syntax).name}: {type(exc).__name__}: {exc}"
            ) from exc
    if ds.get("SOPInstanceUID") != instance_uid:  # never expected; identity is not optional
        ds.SOPInstanceUID = instance_uid
        ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    _describe_decoded_pixels(ds)
    method = _LOSSY_METHOD.get(syntax)
    if method is not None:
        ds.LossyImageCompression = "01"
        if not ds.get("LossyImageCompressionMethod"):
            ds.LossyImageCompressionMethod = method
    return ds


_HEAD_SLACK = 4096
"""Room left before the pixels for header growth while decoding (Photometric
Interpretation, Planar Configuration, Number of Frames, the lossy marks)."""


class _FrameMismatch(Exception):
    """The decoder's frames do not add up to the size the header declares."""


def decompress_encoded(ds: Dataset) -> bytes | bytearray | memoryview:
    """:func:`decompress` then :func:`dicomio.encode`, holding the decoded pixels once.

    Frames are decoded one at a time (pydicom's ``iter_array``, as ``Dataset.decompress``
    does) straight into their place in one preallocated buffer that becomes the output
    file: header, pixel data, trailing elements.  ``decompress`` followed by ``encode``
    held the decoded data three to four times over (the frames, their join, the writer's
    buffer and its copy).  Gives the same bytes; call :func:`check_size` first.

    Raises:
        DecodeError, EncodeError: as :func:`decompress` and :func:`dicomio.encode`.
    """
    if not is_compressed(ds):
        return encode(ds)
    geometry = pixel_geometry(ds)
    if geometry.bits_allocated % 8:
        return encode(decompress(ds))
    frame_bytes = (
        geometry.rows * geometry.columns * geometry.samples_per_pixel * geometry.bits_allocated // 8
    )
    total = frame_bytes * geometry.frames
    padded = total + total % 2
    if padded >= 0xFFFFFFFF:
        raise DecodeError(
            f"cannot decode {UID(transfer_syntax(ds)).name}: {total} bytes of native pixel "
            "data do not fit in one DICOM element"
        )
    syntax = transfer_syntax(ds)
    instance_uid = ds.get("SOPInstanceUID")
    estimate, _ = encode_around_pixels(ds, padded)
    start = (len(estimate) + _HEAD_SLACK + 7) // 8 * 8  # the pixels 8-byte aligned
    buffer = bytearray(start + padded)
    image_pixel: dict[str, str | int] = {}
    try:
        image_pixel, frames = _decode_frames_into(ds, buffer, start, total)
    except _FrameMismatch:
        del buffer
        return encode(decompress(ds))
    # What pydicom's Dataset.decompress does once the frames are decoded.
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(image_pixel["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
    if "NumberOfFrames" in ds or frames > 1:
        ds.NumberOfFrames = frames
    del ds[0x7FE00010]  # the compressed value is not needed any more
    if ds.get("SOPInstanceUID") != instance_uid:
        ds.SOPInstanceUID = instance_uid
        ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    _describe_decoded_pixels(ds)
    method = _LOSSY_METHOD.get(syntax)
    if method is not None:
        ds.LossyImageCompression = "01"
        if not ds.get("LossyImageCompressionMethod"):
            ds.LossyImageCompressionMethod = method
    head, tail = encode_around_pixels(ds, padded)
    if len(head) > start:  # the header grew more than the slack allows: join instead
        return bytes(head) + bytes(memoryview(buffer)[start:]) + tail
    offset = start - len(head)
    buffer[offset:start] = head
    if tail:
        buffer += tail
    return memoryview(buffer)[offset:]


def _decode_frames_into(
    ds: Dataset, buffer: bytearray, start: int, total: int
) -> tuple[dict[str, str | int], int]:
    """Decode every frame of `ds` into ``buffer[start:start + total]``, in order."""
    syntax = transfer_syntax(ds)
    pos = start
    frames = 0
    image_pixel: dict[str, str | int] = {}
    with suppress_pydicom_warnings():
        try:
            decoder = get_decoder(UID(syntax))
            if not decoder.is_available:
                missing = "; ".join(decoder.missing_dependencies)
                raise RuntimeError(f"no decoder plugin is available ({missing})")
            for arr, pixel_info in decoder.iter_array(ds, as_rgb=True):
                image_pixel = pixel_info
                size = int(arr.nbytes)
                if pos + size > start + total:
                    raise _FrameMismatch
                target = np.frombuffer(buffer, dtype=arr.dtype, count=arr.size, offset=pos)
                np.copyto(target.reshape(arr.shape), arr)
                del target, arr
                pos += size
                frames += 1
        except (MemoryError, KeyboardInterrupt, SystemExit, _FrameMismatch):
            raise
        # As in decompress(): hostile data into third-party codecs raises anything.
        except BaseException as exc:
            raise DecodeError(
                f"cannot decode {UID(syntax).name}: {type(exc).__name__}: {exc}"
            ) from exc
    if pos != start + total or not image_pixel:
        raise _FrameMismatch
    return image_pixel, frames


def _describe_decoded_pixels(ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric:
        # Also turns pydicom's PhotometricInterpretation enum member back into plain text.
        ds.PhotometricInterpretation = _DECODED_PHOTOMETRIC.get(photometric, photometric)
    samples = ds.get("SamplesPerPixel")
    if isinstance(samples, int) and samples > 1 and "PlanarConfiguration" not in ds:
        ds.PlanarConfiguration = 0  # pydicom's decoders return pixel-interleaved data


# What an operator calls each family of compressed syntaxes, for the start-up line:
# (name prefix, short name, place in the line); the first matching prefix wins.
_SHORT_NAMES = (
    ("JPEG 2000 Part 2", "JPEG 2000 Part 2", 5),
    ("JPEG 2000", "JPEG 2000", 3),
    ("High-Throughput JPEG 2000", "HTJ2K", 4),
    ("JPIP", "JPIP", 11),
    ("JPEG-LS", "JPEG-LS", 2),
    ("JPEG Lossless", "JPEG lossless", 1),
    ("JPEG", "JPEG", 0),
    ("RLE", "RLE", 6),
    ("MPEG2", "MPEG-2", 7),
    ("MPEG-4", "H.264", 8),
    ("HEVC", "HEVC", 9),
    ("SMPTE", "SMPTE 2110", 10),
)


def _short_names(names: list[str]) -> str:
    found: dict[str, int] = {}
    for name in names:
        bare = name.removeprefix("Fragmentable ")
        short, place = next(
            ((s, i) for prefix, s, i in _SHORT_NAMES if bare.startswith(prefix)), (bare, 99)
        )
        found.setdefault(short, place)
    return ", ".join(sorted(found, key=lambda s: (found[s], s))) or "none"


def log_codecs(decompress: bool) -> None:
    """Say once at start which compressed syntaxes can be decoded here, and which cannot.

    A quarantine full of decode errors is easy to explain when the log said a codec
    was missing.  One short line names the families; each syntax with its UID is
    listed at DEBUG.
    """
    codecs = codec_report()
    usable = sorted(name for name, ok in codecs.items() if ok)
    missing = sorted(name for name, ok in codecs.items() if not ok)
    line = f"decodable compressed transfer syntaxes: {len(usable)} ({_short_names(usable)})"
    if missing and decompress:
        # such files are quarantined while decompress is on
        line += f"; no decoder for {len(missing)} ({_short_names(missing)})"
    log.info("%s", line)
    log.debug("decodable: %s", "; ".join(usable) or "none")
    if missing:
        log.debug("no decoder installed: %s", "; ".join(missing))
