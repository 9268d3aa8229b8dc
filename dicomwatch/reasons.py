"""Every reason code dicomwatch gives for a file, in one place.

A reason is part of the interface: it names the quarantine sub-folder, appears in each
log line and sidecar, and is what an admin filters on (``quarantine/decode_error/``,
``reason=disk_full``).  Keeping them in one enum means a new code is added once and a
typo is a type error, not a silent new folder.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a file was quarantined, renamed, or could not be filed yet."""

    # The file itself can never be filed: it goes to quarantine/<reason>/.
    REJECTED = "rejected"
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    DECODE_ERROR = "decode_error"
    UNSAFE_PATH = "unsafe_path"
    ENCODE_ERROR = "encode_error"
    TOO_MANY_COLLISIONS = "too_many_collisions"
    """Every numbered name for the destination is taken by a different file."""
    WORKER_CRASH = "worker_crash"
    """Workers kept dying (or timing out) on this file; quarantined unread."""

    # Filed, with a note.
    NAME_TAKEN = "name_taken"
    """Another instance had the rendered name; filed under a numbered name."""
    SAME_UID_DIFFERENT_CONTENT = "same_uid_different_content"
    """An archived file has this SOPInstanceUID but other bytes (a ``conflict``)."""

    # Not filed now; the file stays where it is and is tried again.
    DISK_FULL = "disk_full"
    QUOTA_EXCEEDED = "quota_exceeded"
    PERMISSION_DENIED = "permission_denied"
    READ_ONLY = "read_only"
    VANISHED = "vanished"
    IO_ERROR = "io_error"
    RETRY = "retry"
    OUT_OF_MEMORY = "out_of_memory"
    CLAIM_FAILED = "claim_failed"
    """The daemon could not rename the file out of its inbox folder."""
    CHANGED_WHILE_FILING = "changed_while_filing"
    """The source changed after it was read: it is kept, and filed again once settled."""
    SOURCE_IS_FILED_COPY = "source_is_filed_copy"
    """The source is the very archive file it duplicates (the archive under another
    name): it is never removed."""
    STILL_CHANGING = "still_changing"
    """``sort --move``: still being written when the wait after the walk ended."""
    TIMEOUT = "timeout"
    """A worker held the file longer than ``task_timeout_seconds`` and was killed."""

    def __str__(self) -> str:
        return self.value


CRASH_REASONS = frozenset({Reason.WORKER_CRASH, Reason.OUT_OF_MEMORY, Reason.TIMEOUT})
"""Failures that may be the file's own doing (a decoder crash, a memory blow-up, a hang):
each costs the file an attempt, and ``max_attempts`` of them quarantine it."""
