"""One error hierarchy, grouped by what happens to the file.

Callers never need to know which library failed: they only need to know whether the
file should be retried later (``RetryableError``) or set aside with a reason
(``RejectedError``).  Every library exception is wrapped into one of these at the
module that calls the library, with ``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations


class DicomwatchError(Exception):
    """Base class of every error dicomwatch raises on purpose."""


class ConfigError(DicomwatchError):
    """The configuration cannot be used; the process exits with status 78 (EX_CONFIG)."""


class RetryableError(DicomwatchError):
    """A condition of the environment, not of the file: disk full, permission, vanished.

    The file stays where it is and is tried again later.
    """


class RejectedError(DicomwatchError):
    """The file itself can never be filed; it goes to quarantine with this reason.

    ``reason`` is a short stable code (used in the sidecar and the log); the message is
    for people.
    """

    reason = "rejected"


class NotDicomError(RejectedError):
    """Not a DICOM file, or lacking what the archive needs (SOPInstanceUID)."""

    reason = "not_dicom"


class IncompleteError(RejectedError):
    """The file ends before its data does (truncated header or pixel data)."""

    reason = "truncated"


class TooLargeError(RejectedError):
    """The pixel data would decode to more bytes than ``max_decoded_bytes`` allows."""

    reason = "too_large"


class DecodeError(RejectedError):
    """The pixel data could not be decompressed."""

    reason = "decode_error"


class UnsafePathError(RejectedError):
    """The rendered destination would fall outside the archive root."""

    reason = "unsafe_path"


class WorkerCrashError(RejectedError):
    """A worker process died repeatedly while holding this file."""

    reason = "worker_crash"


class EncodeError(RejectedError):
    """The dataset could not be written back out as DICOM."""

    reason = "encode_error"


class TooManyCollisionsError(RejectedError):
    """Every numbered name for this destination is taken by a different file."""

    reason = "too_many_collisions"
