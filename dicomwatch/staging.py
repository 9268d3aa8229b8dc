"""The staging folders one process owns in each output root, and the settings naming them.

``dicomwatch sort`` and ``dicomwatch run`` both start here, so the two can never differ
in how they prepare the archive.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from dicomwatch.archive import StagingOwner, clean_stale_staging
from dicomwatch.config import Config
from dicomwatch.sorter import EngineSettings

log = logging.getLogger(__name__)


@dataclass
class Staging:
    """Staging ownership for the archive, quarantine (and processed) roots."""

    cfg: Config
    owner: str
    keep_processed: bool = False
    _owners: list[StagingOwner] = field(default_factory=list)
    settings: EngineSettings | None = None

    def open(self) -> EngineSettings:
        roots = [self.cfg.archive, self.cfg.quarantine]
        if self.keep_processed:
            roots.append(self.cfg.processed)
        stagings: list[Path] = []
        for root in roots:
            removed = clean_stale_staging(root)
            if removed:
                log.info(
                    "removed %d temporary files left by an interrupted run in %s", removed, root
                )
            owner = StagingOwner(root, self.owner)
            self._owners.append(owner)
            stagings.append(owner.path)
        self.settings = self.settings_for(self.cfg, stagings)
        return self.settings

    def settings_for(self, cfg: Config, stagings: list[Path] | None = None) -> EngineSettings:
        """Settings for ``cfg`` with this engine's staging folders (also after a reload)."""
        if stagings is None:
            stagings = [o.path for o in self._owners]
        return EngineSettings(
            archive=cfg.archive,
            quarantine=cfg.quarantine,
            archive_staging=stagings[0],
            quarantine_staging=stagings[1],
            template_text=cfg.template,
            decompress=cfg.decompress,
            max_decoded_bytes=cfg.max_decoded_bytes,
            fsync=cfg.fsync,
            node_id=cfg.effective_node_id,
            processed=cfg.processed if self.keep_processed else None,
            processed_staging=stagings[2] if self.keep_processed else None,
        )

    def close(self) -> None:
        for owner in self._owners:
            owner.release()
        self._owners.clear()

    def __enter__(self) -> EngineSettings:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def owner_name(cfg: Config, role: str) -> str:
    """A staging owner name unique to this process, readable in a directory listing.

    The pid alone is not unique: two containers sharing one archive both run as pid 1,
    so a short random token follows it.
    """
    return f"{cfg.effective_node_id}.{role}.{os.getpid()}.{secrets.token_hex(3)}"
