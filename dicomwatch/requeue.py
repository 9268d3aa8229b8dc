"""``dicomwatch quarantine retry``: send quarantined files back through the inbox.

Each file is moved (never copied over anything) into the inbox under a name the daemon
does not ignore and no other file has; the move is atomic, so the daemon sees the whole
file or nothing.  Its ``.reason.json`` stays in the quarantine until the file is back
in the inbox, and is removed only then: a crash in between leaves either the file in
quarantine with its record, or the file in the inbox and a record that ``index
check``/``rebuild`` and the next retry ignore.  A file that failed to decode is not
retried while its decoder is still missing: it would only come straight back.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import shutil
import sys
from pathlib import Path

from dicomwatch.archive import fsync_dir, move_noreplace
from dicomwatch.config import INTERNAL_DIR, Config
from dicomwatch.indexdb import IndexError_, open_index
from dicomwatch.layout import numbered
from dicomwatch.rebuild import quarantine_files, quarantine_row
from dicomwatch.sidecar import SIDECAR_SUFFIX
from dicomwatch.watcher import is_ignored

RETRY_DIR = "retry"
MAX_NAMES = 10_000


class Refused(Exception):
    """This file is not retried; the message says why."""


def inbox_name(rel: str, cfg: Config) -> str:
    """A name for the file in the inbox that the ignore patterns let through."""
    name = Path(rel).name.lstrip(".") or "retried.dcm"
    if is_ignored(name, cfg.ignore):
        name += ".dcm"
    if is_ignored(name, cfg.ignore) or name == INTERNAL_DIR:
        raise Refused(f"every name for {rel} is ignored by the ignore patterns")
    return name


def missing_decoder(path: Path) -> str | None:
    """The transfer syntax (name and UID) of ``path`` when no decoder for it is installed."""
    from pydicom import dcmread

    from dicomwatch.decode import codec_report
    from dicomwatch.dicomio import suppress_pydicom_warnings

    try:
        with suppress_pydicom_warnings():
            ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - unreadable header: nothing to say about codecs
        return None
    for key, available in codec_report().items():
        if key.endswith(" " + ts) and not available:
            return key
    return None


def _place(src: Path, inbox: Path, name: str) -> Path:
    """Move ``src`` into ``inbox`` under ``name`` or a numbered variant, never replacing."""
    staged: Path | None = None
    try:
        for n in range(MAX_NAMES):
            dst = inbox / numbered(name, n)
            try:
                move_noreplace(str(staged or src), str(dst))
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV or staged is not None:
                    raise
                # Another filesystem (or another bind mount of one): copy into the inbox's
                # own folder, which the daemon never reads, then move from there.
                staged = _stage_copy(src, inbox)
                continue
            if staged is not None:
                staged = None
                os.unlink(src)
            return dst
        raise Refused(f"no free name for {name} in {inbox}")
    finally:
        if staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(staged)


def _stage_copy(src: Path, inbox: Path) -> Path:
    folder = inbox / INTERNAL_DIR / RETRY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{secrets.token_hex(8)}.dwtmp"
    with src.open("rb") as fin, tmp.open("xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    return tmp


def _targets(args: argparse.Namespace, cfg: Config) -> list[str]:
    """Quarantine-relative paths to retry; ``Refused`` for a path outside the quarantine."""
    if args.all:
        return list(quarantine_files(cfg))
    if args.reason:
        return [rel for rel in quarantine_files(cfg) if rel.split("/", 1)[0] == args.reason]
    out: list[str] = []
    for given in args.paths:
        path = Path(os.path.abspath(given))
        if not path.exists() and not given.is_absolute():
            path = cfg.quarantine / given
        try:
            rel = path.relative_to(cfg.quarantine).as_posix()
        except ValueError:
            raise Refused(f"{given} is not in the quarantine {cfg.quarantine}") from None
        if rel.endswith(SIDECAR_SUFFIX) or rel.split("/", 1)[0] == INTERNAL_DIR:
            raise Refused(f"{given} is not a quarantined file")
        out.append(rel)
    return out


def retry_command(args: argparse.Namespace, cfg: Config) -> int:
    if not (args.paths or args.reason or args.all):
        print("dicomwatch quarantine retry: give PATHs, --reason R or --all", file=sys.stderr)
        return 2
    try:
        targets = _targets(args, cfg)
    except Refused as exc:
        print(f"dicomwatch quarantine retry: {exc}", file=sys.stderr)
        return 2
    failed = 0
    back: list[str] = []
    for rel in targets:
        src = cfg.quarantine / rel
        try:
            if not src.is_file():
                raise Refused(f"{src}: no such quarantined file")
            row = quarantine_row(cfg, rel)
            if cfg.decompress and row.reason == "decode_error":
                missing = missing_decoder(src)
                if missing:
                    raise Refused(
                        f"{src}: not retried: it could not be decoded and there is still no "
                        f"decoder for {missing}; install one (see the README's codec list), "
                        "or set 'decompress: false' to archive it as it is"
                    )
            name = inbox_name(rel, cfg)
            if args.dry_run:
                print(f"would retry {src} -> {cfg.inbox / name}")
                continue
            cfg.inbox.mkdir(parents=True, exist_ok=True)
            dst = _place(src, cfg.inbox, name)
            fsync_dir(cfg.inbox)
            fsync_dir(src.parent)
        except Refused as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:
            print(f"{src}: not retried: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        with contextlib.suppress(FileNotFoundError):
            src.with_name(src.name + SIDECAR_SUFFIX).unlink()
        back.append(rel)
        print(f"retried {src} -> {dst}")
    if back and cfg.index != "none":
        try:
            with open_index(cfg, create=False) as index, index.transaction():
                index.delete_quarantined(back)
        except IndexError_ as exc:
            print(
                f"note: the index still lists them ({exc}); 'dicomwatch index rebuild' fixes it",
                file=sys.stderr,
            )
    return 1 if failed else 0
