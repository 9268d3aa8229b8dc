"""Typed configuration: built once at start-up, validated strictly, passed explicitly.

A daemon that misreads its configuration files images into the wrong place for hours
before anyone notices, so every mistake we can see at load time is a ``ConfigError``
with a message that names the key and says what would be right (exit status 78, which
the systemd unit treats as "do not restart").  Nothing here is module-level state.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from dicomwatch.errors import ConfigError
from dicomwatch.layout import DEFAULT_TEMPLATE, compile_template

AfterFiling = Literal["delete", "move"]
ObserverKind = Literal["auto", "native", "polling"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

DEFAULT_IGNORE: tuple[str, ...] = (".*", "*.part", "*.tmp", "*.partial", "*~")
"""Names senders use while a transfer is in progress (rsync's ``.name.XXXXXX``, scp and
browser ``.part``/``.tmp``, editor backups).  They are renamed to the final name when
complete, and that rename is what gets reported."""

INTERNAL_DIR = ".dicomwatch"
"""dicomwatch's own folder inside the inbox (claims) and each output root (staging).
Never reported or sorted, whatever the ignore patterns say, so a custom pattern list
cannot make the daemon eat its own files."""


@dataclass(frozen=True)
class Config:
    """Every setting of dicomwatch; the defaults are the embedded no-config set-up."""

    inbox: Path = Path("inbox")
    archive: Path = Path("archive")
    quarantine: Path = Path("quarantine")
    processed: Path = Path("processed")
    template: str = DEFAULT_TEMPLATE
    decompress: bool = True
    max_decoded_bytes: int = 4 * 1024**3
    workers: int = 0
    worker_memory_mb: int = 0
    after_filing: AfterFiling = "delete"
    observer: ObserverKind = "auto"
    polling_interval_seconds: float = 1.0
    settle_seconds: float = 2.0
    rescan_seconds: float = 60.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    max_pending: int = 256
    max_attempts: int = 3
    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    task_timeout_seconds: float = 300.0
    stuck_warning_seconds: float = 600.0
    shutdown_timeout_seconds: float = 60.0
    summary_seconds: float = 300.0
    empty_dir_grace_seconds: float = 300.0
    node_id: str = ""
    fsync: bool = True
    log_format: LogFormat = "text"
    log_level: LogLevel = "INFO"

    @property
    def effective_workers(self) -> int:
        """``workers: 0`` means one per usable core (the affinity mask, not the host)."""
        if self.workers > 0:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not on Linux
            return max(1, os.cpu_count() or 1)

    @property
    def effective_node_id(self) -> str:
        """Names this daemon's claim folder; two daemons on one inbox need distinct ids."""
        return self.node_id or socket.gethostname() or "node"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for printing the effective configuration as YAML."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
            else:
                out[key] = value
        out["node_id"] = self.effective_node_id
        return out


_FIELDS = {f.name: f for f in fields(Config)}
_PATH_KEYS = ("inbox", "archive", "quarantine", "processed")
_CHOICES: dict[str, tuple[str, ...]] = {
    "after_filing": get_args(AfterFiling),
    "observer": get_args(ObserverKind),
    "log_format": get_args(LogFormat),
    "log_level": get_args(LogLevel),
}
# (minimum, must be strictly greater) for numeric keys
_MINIMUMS: dict[str, tuple[float, bool]] = {
    "max_decoded_bytes": (0, True),
    "workers": (0, False),
    "worker_memory_mb": (0, False),
    "polling_interval_seconds": (0, True),
    "settle_seconds": (0, False),
    "rescan_seconds": (0, True),
    "max_pending": (1, False),
    "max_attempts": (1, False),
    "retry_initial_seconds": (0, True),
    "retry_max_seconds": (0, True),
    "task_timeout_seconds": (0, False),
    "stuck_warning_seconds": (0, True),
    "shutdown_timeout_seconds": (0, False),
    "summary_seconds": (0, True),
    "empty_dir_grace_seconds": (0, False),
}


def _coerce(key: str, value: Any) -> Any:
    """Check one YAML value against the field's type; YAML's loose typing is not ours."""
    default = _FIELDS[key].default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number of seconds, got {value!r}")
        return number
    if isinstance(default, Path):
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise ConfigError(f"{key}: expected a folder path, got {value!r}")
        try:
            return Path(value).expanduser()
        except RuntimeError as exc:  # ~user of an unknown user, or no home folder
            raise ConfigError(f"{key}: cannot expand '~' in {value!r} ({exc})") from exc
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_mapping(raw: Mapping[str, Any], *, source: str = "config") -> Config:
    """Build and validate a Config from parsed YAML; every problem names its key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of key: value")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "receiver":
            # read by `dicomwatch receive`; checked here so a bad section fails like any key
            from dicomwatch.receiver_config import receiver_from_mapping

            receiver_from_mapping(value, source=source)
            continue
        if not isinstance(key, str) or key not in _FIELDS:
            hint = _did_you_mean(str(key), list(_FIELDS))
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        if key == "log_level" and isinstance(value, str):
            value = value.upper()  # logging's own names are upper-case; "info" means INFO
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    try:
        cfg = Config(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{source}: {exc}") from exc
    return validate(cfg, source=source)


def validate(
    cfg: Config, *, source: str = "config", is_keyword: Callable[[str], bool] | None = None
) -> Config:
    """Check relations between values and make folder paths absolute.

    Paths are made absolute once here, relative to the current directory at load time,
    so nothing later depends on the working directory.
    """
    for key, choices in _CHOICES.items():
        value = getattr(cfg, key)
        if value not in choices:
            raise ConfigError(
                f"{source}: {key}: {value!r} is not one of {', '.join(choices)}"
                f"{_did_you_mean(str(value), choices)}"
            )
    for key, (minimum, strict) in _MINIMUMS.items():
        value = getattr(cfg, key)
        if value < minimum or (strict and value == minimum):
            rel = ">" if strict else ">="
            raise ConfigError(f"{source}: {key}: must be {rel} {minimum}, got {value!r}")
    if cfg.retry_max_seconds < cfg.retry_initial_seconds:
        raise ConfigError(f"{source}: retry_max_seconds must be >= retry_initial_seconds")
    if cfg.node_id and not all(c.isalnum() or c in "-_." for c in cfg.node_id):
        raise ConfigError(f"{source}: node_id: only letters, digits, '-', '_' and '.' are allowed")
    if cfg.node_id in (".", ".."):
        # it names a folder: '.' or '..' would be the claims folder itself or its parent
        raise ConfigError(f"{source}: node_id: {cfg.node_id!r} cannot name a folder")

    suggest: Callable[[str], str | None] = _no_suggestion
    if is_keyword is None:
        from dicomwatch import dicomio

        is_keyword = dicomio.is_known_keyword
        suggest = dicomio.suggest_keyword

    try:
        compile_template(cfg.template, is_keyword=is_keyword)
    except ConfigError as exc:
        message = str(exc)
        for word in _unknown_words(cfg.template, is_keyword):
            better = suggest(word)
            if better:
                message += f" (did you mean {better!r}?)"
                break
        raise ConfigError(f"{source}: template: {message}") from exc

    def absolute(path: Path) -> Path:
        return Path(os.path.abspath(path))

    cfg = replace(
        cfg,
        inbox=absolute(cfg.inbox),
        archive=absolute(cfg.archive),
        quarantine=absolute(cfg.quarantine),
        processed=absolute(cfg.processed),
    )
    _check_folder_relations(cfg, source)
    return cfg


def _no_suggestion(_name: str) -> None:
    return None


def _unknown_words(template: str, is_keyword: Callable[[str], bool]) -> list[str]:
    import string

    words: list[str] = []
    for part in template.split("/"):
        try:
            parsed = list(string.Formatter().parse(part))
        except ValueError:
            continue
        words += [f for _, f, _, _ in parsed if f and not is_keyword(f)]
    return words


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_folder_relations(cfg: Config, source: str) -> None:
    """The inbox must not overlap any output folder, or the daemon would eat its own output.

    Both the paths as written and with symlinks followed are compared: a symlink must
    not hide an archive inside the inbox.
    """
    real = {key: Path(os.path.realpath(getattr(cfg, key))) for key in _PATH_KEYS}

    def inside(a: str, b: str) -> bool:
        return _inside(getattr(cfg, a), getattr(cfg, b)) or _inside(real[a], real[b])

    outputs = ["archive", "quarantine"]
    if cfg.after_filing == "move":
        outputs.append("processed")
    for key in outputs:
        out = getattr(cfg, key)
        if inside("inbox", key):
            raise ConfigError(f"{source}: inbox {cfg.inbox} is equal to or inside {key} {out}")
        if inside(key, "inbox"):
            raise ConfigError(f"{source}: {key} {out} is inside the inbox {cfg.inbox}")
    if cfg.archive == cfg.quarantine or real["archive"] == real["quarantine"]:
        raise ConfigError(f"{source}: archive and quarantine must be different folders")


def load_config(path: Path | None) -> Config:
    """Read a YAML file (or the embedded default when ``path`` is None)."""
    if path is None:
        return validate(Config(), source="default config")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    return config_from_mapping(raw, source=str(path))


def prepare_folders(cfg: Config, *, create: bool = True, include_inbox: bool = True) -> None:
    """Create the folders and prove they are writable before any file is touched.

    Failing here (exit 78) is kinder than failing every file later with EACCES.
    """
    keys = list(_PATH_KEYS[1:] if not include_inbox else _PATH_KEYS)
    if cfg.after_filing != "move" and "processed" in keys:
        keys.remove("processed")
    for key in keys:
        folder: Path = getattr(cfg, key)
        if create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{key}: cannot create {folder}: {exc.strerror or exc}") from exc
        elif not os.path.lexists(folder):
            # check-config before the first run: fine if ``run`` will be able to create it.
            parent = folder.parent
            while not os.path.lexists(parent) and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"{key}: {folder} does not exist and cannot be created "
                    f"({parent} is not a writable folder)"
                )
            continue
        if not folder.is_dir():
            raise ConfigError(f"{key}: {folder} does not exist or is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {folder} is not writable by this user")


def render_yaml(cfg: Config) -> str:
    """The effective configuration, as a config file would say it."""
    values = cfg.to_dict()
    text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != values:
        # PyYAML writes U+0085 (NEL) raw, and reading folds it to a space: escape instead
        text = yaml.safe_dump(values, sort_keys=False, allow_unicode=False)
    return text
