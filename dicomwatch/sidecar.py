"""The ``<name>.reason.json`` record beside every quarantined file.

One type for the writer (the sorter, in a worker) and every reader (``quarantine list``,
an index rebuild, an admin's script), so the two can never drift.  The record is
versioned: a reader accepts every version it knows and refuses a newer one clearly,
rather than guessing at fields it has never seen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

SIDECAR_SUFFIX = ".reason.json"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class QuarantineRecord:
    """Why a file is in quarantine, and where it came from."""

    reason: str
    error: str
    source: str
    time: str
    """When it was quarantined, ISO 8601 in UTC, to the second."""
    sop_instance_uid: str | None
    node: str
    attempts: int
    outcome: str = "quarantined"
    version: int = SIDECAR_VERSION

    def to_bytes(self) -> bytes:
        """Pretty JSON, one record per file.

        A source name that is not UTF-8 holds surrogate escapes; ``backslashreplace``
        writes them as JSON ``\\udcXX`` escapes, which read back to the same name.
        """
        text = json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"
        return text.encode("utf-8", "backslashreplace")

    @classmethod
    def from_bytes(cls, data: bytes) -> QuarantineRecord:
        """Parse a sidecar; ``ValueError`` for anything that is not a record we know."""
        try:
            raw: Any = json.loads(data.decode("utf-8", "surrogateescape"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a quarantine record: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError("not a quarantine record: not a JSON object")
        version = raw.get("version", 1)
        if not isinstance(version, int) or version > SIDECAR_VERSION:
            raise ValueError(f"quarantine record version {version!r} is newer than this dicomwatch")
        try:
            return cls(
                reason=str(raw["reason"]),
                error=str(raw.get("error", "")),
                source=str(raw.get("source", "")),
                time=str(raw.get("time", "")),
                sop_instance_uid=(
                    None if raw.get("sop_instance_uid") is None else str(raw["sop_instance_uid"])
                ),
                node=str(raw.get("node", "")),
                attempts=int(raw.get("attempts", 0)),
                outcome=str(raw.get("outcome", "quarantined")),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a quarantine record: {exc}") from exc
