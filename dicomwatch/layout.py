"""Turn a path template plus tag values into a safe relative archive path.

Tag values come from files dropped into a shared inbox, so they are attacker-controlled
input: a PatientID of ``../../etc`` or a SeriesDescription of 1000 characters must
neither escape the archive root nor break the file system's limits.  This module is
kept pure (no pydicom, no I/O) so that this guarantee can be property-tested in
isolation; ``ensure_inside`` is the one check that has to look at the real tree,
because only the file system knows where a symlink points.

Folder values follow the classic sort script (lower-case, ``*.,"\\/|[]:;`` and
whitespace become ``_``) so existing archives keep their layout; the file name keeps
case and dots, as that script did, because ``Modality.SeriesUID.Number.dcm`` is
what people search for.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dicomwatch.errors import ConfigError, UnsafePathError

DEFAULT_TEMPLATE = (
    "{PatientID}/{StudyDate}/{StudyDescription}/{SeriesDescription}/"
    "{Modality}.{SeriesInstanceUID}.{InstanceNumber}.dcm"
)
MAX_COMPONENT_BYTES = 255
MISSING = "NA"

# A component is a sequence of (literal text, field name or None) pieces.
Piece = tuple[str, str | None]
Component = tuple[Piece, ...]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})
_FOLDER_CHARS = frozenset('*.,"\\/|[]:;<>?')
_FILENAME_CHARS = frozenset('/\\*,"|[]:;<>?')
_KEYWORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXTENSION_RE = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}\Z")
_HASH_CHARS = 12
_RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul"}
    | {f"{dev}{n}" for dev in ("com", "lpt") for n in "123456789\u00b9\u00b2\u00b3"}
)


@dataclass(frozen=True)
class Template:
    """A template parsed once, so values can never be re-read as template syntax.

    Only tuples and frozensets are stored, so a Template is hashable and can be sent
    to worker processes.
    """

    text: str
    keywords: frozenset[str]
    folders: tuple[Component, ...]
    filename: Component


def _template_error(text: str, problem: str) -> ConfigError:
    return ConfigError(f"invalid path template {text!r}: {problem}")


def _parse_component(
    text: str, component: str, is_keyword: Callable[[str], bool] | None
) -> Component:
    """Reject every format feature except plain ``{Keyword}``: the rest would let a
    template reach into Python objects or make output depend on formatting rules."""
    try:
        parsed = list(string.Formatter().parse(component))
    except ValueError as exc:
        raise _template_error(text, f"unbalanced braces in {component!r} ({exc})") from exc
    pieces: list[Piece] = []
    for literal, field, spec, conversion in parsed:
        if field is not None:
            if field == "":
                raise _template_error(text, "empty field '{}' (name a DICOM keyword)")
            if field.isdigit():
                raise _template_error(text, f"positional field {{{field}}} (name a DICOM keyword)")
            if not _KEYWORD_RE.fullmatch(field):
                raise _template_error(
                    text, f"field {{{field}}} is not a plain keyword (no '.', '[]' or spaces)"
                )
            if conversion is not None:
                raise _template_error(text, f"conversion '!{conversion}' in {{{field}}}")
            if spec:
                raise _template_error(text, f"format spec ':{spec}' in {{{field}}}")
            if is_keyword is not None and not is_keyword(field):
                raise ConfigError(f"unknown DICOM keyword {field!r} in template {text!r}")
        if pieces and pieces[-1][1] is None:
            pieces[-1] = (pieces[-1][0] + literal, field)
        elif literal or field is not None:
            pieces.append((literal, field))
    return tuple(pieces)


def compile_template(text: str, is_keyword: Callable[[str], bool] | None = None) -> Template:
    """Validate the whole template at start-up, so a typo is a configuration error
    (exit 78) instead of a surprise on the first file that arrives."""
    if text.startswith("/"):
        raise _template_error(text, "must be relative (leading '/')")
    if "\\" in text:
        raise _template_error(text, "backslash is not allowed (use '/' between levels)")
    bad = [c for c in text if unicodedata.category(c) in _UNSAFE_CATEGORIES - {"Zs"}]
    if bad:
        raise _template_error(text, f"contains control or format character {bad[0]!r}")
    components: list[Component] = []
    for component in text.split("/"):
        if component == "":
            raise _template_error(text, "empty path component ('//' or trailing '/')")
        if component in (".", ".."):
            raise _template_error(text, f"component {component!r} is not allowed")
        components.append(_parse_component(text, component, is_keyword))
    keywords = frozenset(f for comp in components for _, f in comp if f is not None)
    return Template(text, keywords, tuple(components[:-1]), components[-1])


def _replace_chars(value: str, chars: frozenset[str]) -> str:
    return "".join(
        "_" if c in chars or c.isspace() or unicodedata.category(c) in _UNSAFE_CATEGORIES else c
        for c in value
    )


def clean_component(value: str | None) -> str:
    """Clean one value for a folder level, keeping the classic script's names.

    Missing and present-but-empty both give ``MISSING`` so a level never disappears
    (which would shift the hierarchy).  ``MISSING`` itself is a fixed point, so
    cleaning is idempotent.
    """
    if value is None or value == "" or value == MISSING:
        return MISSING
    lowered = unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).lower())
    return _replace_chars(lowered, _FOLDER_CHARS)


def clean_filename_field(value: str | None) -> str:
    """Clean one value for the file name: case and dots survive (UIDs are dotted and
    ``CT``/``MR`` are looked up as written); only what is unsafe is replaced."""
    if value is None or value == "":
        return MISSING
    return _replace_chars(unicodedata.normalize("NFC", value), _FILENAME_CHARS)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[: max(max_bytes, 0)].decode("utf-8", errors="ignore")


def _split_extension(name: str) -> tuple[str, str]:
    match = _EXTENSION_RE.search(name)
    return (name[: match.start()], match.group()) if match else (name, "")


def _finish(component: str, is_filename: bool) -> str:
    """Make a joined component valid on every file system we may be copied to.

    Windows forbids trailing dots/spaces and device names; every common file system
    caps a name at 255 bytes.  A long name keeps a hash of the full text so distinct
    values stay distinct after truncation.  No name starts with a dot: hidden files
    surprise people browsing the archive, and inbox tools treat dot-names as temporary.
    """
    if component == "":
        component = MISSING
    if component.startswith("."):
        component = "_" + component[1:]
    stripped = component.rstrip(". ")
    component = stripped + "_" * (len(component) - len(stripped))
    if component.split(".", 1)[0].rstrip(" ").lower() in _RESERVED_NAMES:
        component = "_" + component
    if _utf8_len(component) > MAX_COMPONENT_BYTES:
        digest = hashlib.sha256(component.encode("utf-8")).hexdigest()[:_HASH_CHARS]
        stem, ext = _split_extension(component) if is_filename else (component, "")
        tail = f"~{digest}{ext}"
        component = _truncate_utf8(stem, MAX_COMPONENT_BYTES - _utf8_len(tail)) + tail
    return component


def _instance_fallback(sop_instance_uid: str) -> str:
    data = sop_instance_uid.encode("utf-8", errors="surrogatepass")
    return "uid-" + hashlib.sha256(data).hexdigest()[:16]


def _render_component(
    component: Component,
    values: Mapping[str, str | None],
    sop_instance_uid: str,
    is_filename: bool,
) -> str:
    clean = clean_filename_field if is_filename else clean_component
    parts: list[str] = []
    for literal, field in component:
        parts.append(literal)
        if field is None:
            continue
        value = values.get(field)
        if field == "SOPInstanceUID" and value is None:
            value = sop_instance_uid
        if field == "InstanceNumber" and not value:
            value = _instance_fallback(sop_instance_uid)
        parts.append(clean(value))
    return _finish("".join(parts), is_filename)


def _check_part(part: str) -> None:
    if part in ("", ".", "..") or "/" in part or "\x00" in part:
        raise UnsafePathError(f"unsafe path component {part!r}")
    try:
        size = _utf8_len(part)
    except UnicodeEncodeError as exc:
        raise UnsafePathError(f"path component {part!r} is not valid text") from exc
    if size > MAX_COMPONENT_BYTES:
        raise UnsafePathError(f"path component is {size} bytes long")


def render(
    template: Template, values: Mapping[str, str | None], sop_instance_uid: str
) -> PurePosixPath:
    """Build the relative destination; the checks at the end are a second line of
    defence so that a future change to the cleaning rules fails closed."""
    parts = [_render_component(c, values, sop_instance_uid, False) for c in template.folders]
    parts.append(_render_component(template.filename, values, sop_instance_uid, True))
    for part in parts:
        _check_part(part)
    path = PurePosixPath(*parts)
    if path.is_absolute() or path.parts != tuple(parts):
        raise UnsafePathError(f"rendered path {str(path)!r} is not a plain relative path")
    return path


def numbered(name: str, n: int) -> str:
    """Name for the n-th colliding file, keeping ``.dcm`` at the end so tools that
    filter by extension still see it; distinct for every n, never over 255 bytes."""
    if n < 0:
        raise ValueError(f"collision number must be >= 0, got {n}")
    if n == 0:
        return name
    stem, ext = _split_extension(name)
    tail = f"~{n}{ext}"
    budget = MAX_COMPONENT_BYTES - _utf8_len(tail)
    result = _truncate_utf8(stem, budget) + tail
    if result == name:  # only possible when truncation recreated the original name
        result = _truncate_utf8(stem, budget)[:-1] + tail
    return result


def ensure_inside(root: Path, rel: PurePosixPath) -> Path:
    """Last check before writing: refuse anything that, once symlinks are followed,
    would land outside the archive (a symlink planted in the tree, a crafted path)."""
    text = str(rel)
    if rel.is_absolute() or text in ("", ".") or "\x00" in text:
        raise UnsafePathError(f"destination {text!r} is not a relative file path")
    if any(part in ("", ".", "..") for part in rel.parts):
        raise UnsafePathError(f"destination {text!r} has a '.' or '..' component")
    target = root / rel
    try:
        real_root = root.resolve()
        real_target = target.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop, unreadable directory
        raise UnsafePathError(f"destination {text!r} cannot be resolved: {exc}") from exc
    if real_target == real_root or not real_target.is_relative_to(real_root):
        raise UnsafePathError(f"destination {text!r} resolves outside the archive {root}")
    return target
