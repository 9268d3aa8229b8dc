"""One error hierarchy, grouped by what happens to the file.

Callers never need to know which library failed: they only need to know whether the
file should be retried later (``RetryableError``) or set aside with a reason
(``RejectedError``).  Every library exception is wrapped into one of these at the
module that calls the library, with ``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations

from dicomwatch.reasons import Reason


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

    ``reason`` is a short stable code (a :class:`Reason`, used in the sidecar and the
    log); the message is for people.
    """

    reason = Reason.REJECTED


class NotDicomError(RejectedError):
    """Not a DICOM file, or lacking what the archive needs (SOPInstanceUID)."""

    reason = Reason.NOT_DICOM


class IncompleteError(RejectedError):
    """The file ends before its data does (truncated header or pixel data)."""

    reason = Reason.TRUNCATED


class TooLargeError(RejectedError):
    """The pixel data would decode to more bytes than ``max_decoded_bytes`` allows."""

    reason = Reason.TOO_LARGE


class DecodeError(RejectedError):
    """The pixel data could not be decompressed."""

    reason = Reason.DECODE_ERROR


class UnsafePathError(RejectedError):
    """The rendered destination would fall outside the archive root."""

    reason = Reason.UNSAFE_PATH


class WorkerCrashError(RejectedError):
    """A worker process died repeatedly while holding this file."""

    reason = Reason.WORKER_CRASH


class EncodeError(RejectedError):
    """The dataset could not be written back out as DICOM."""

    reason = Reason.ENCODE_ERROR


class TooManyCollisionsError(RejectedError):
    """Every numbered name for this destination is taken by a different file."""

    reason = Reason.TOO_MANY_COLLISIONS
