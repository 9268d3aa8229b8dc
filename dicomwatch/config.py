"""Typed configuration: built once at start-up, validated strictly, passed explicitly.

A daemon that misreads its configuration files images into the wrong place for hours
before anyone notices, so every mistake we can see at load time is a ``ConfigError``
with a message that names the key and says what would be right (exit status 78, which
the systemd unit treats as "do not restart").  Nothing here is module-level state.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

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

log = logging.getLogger(__name__)

INTERNAL_DIR = ".dicomwatch"
"""dicomwatch's own folder inside the inbox (claims) and each output root (staging).
Never reported or sorted, whatever the ignore patterns say, so a custom pattern list
cannot make the daemon eat its own files."""


@dataclass(frozen=True)
class Config:
    """Every setting of dicomwatch; the defaults are the embedded no-config set-up
    (except ``create_folders``, which ``dicomwatch run`` without ``--config`` turns on)."""

    inbox: Path = Path("inbox")
    archive: Path = Path("archive")
    quarantine: Path = Path("quarantine")
    processed: Path = Path("processed")
    create_folders: bool = False
    """Make missing folders (with their parents) at start.  Off, a missing inbox is
    refused: an unmounted share must not turn into an empty local folder that is
    watched forever.  Output folders are then made only where their parent exists."""
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
    state_dir: Path = Path(".dicomwatch-state")
    """dicomwatch's own state (the SQLite index); local disk, outside every folder above."""
    index: str = "sqlite"
    """``sqlite`` (``state_dir/index.sqlite3``), ``none``, or a ``postgresql://`` URL."""

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


def _raise_if(problems: list[str], source: str) -> None:
    """One ConfigError for every problem found, each on its own line, naming the source."""
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))


def config_from_mapping(raw: Mapping[str, Any], *, source: str = "config") -> Config:
    """Build and validate a Config from parsed YAML; every problem names its key.

    Every problem is reported, not only the first: one run of ``check-config`` lists
    all that needs fixing.
    """
    cfg, problems = _from_mapping(raw, source)
    _raise_if(problems, source)
    assert cfg is not None
    return cfg


def _from_mapping(raw: Mapping[str, Any], source: str) -> tuple[Config | None, list[str]]:
    if not isinstance(raw, Mapping):
        return None, ["the top level must be a mapping of key: value"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    refused: set[str] = set()
    for key, value in raw.items():
        if key == "receiver":
            # read by `dicomwatch receive`; checked here so a bad section fails like any key
            from dicomwatch.receiver_config import receiver_from_mapping

            receiver_from_mapping(value, source=source)
            continue
        if not isinstance(key, str) or key not in _FIELDS:
            hint = _did_you_mean(str(key), list(_FIELDS))
            problems.append(f"unknown key {key!r}{hint}")
            continue
        if key == "log_level" and isinstance(value, str):
            value = value.upper()  # logging's own names are upper-case; "info" means INFO
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            problems.append(str(exc))
            refused.add(key)
    try:
        cfg = Config(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        return None, [*problems, str(exc)]
    cfg, more = _checked(cfg, source=source, refused=refused)
    return cfg, problems + more


def validate(
    cfg: Config, *, source: str = "config", is_keyword: Callable[[str], bool] | None = None
) -> Config:
    """Check relations between values and make folder paths absolute.

    Paths are made absolute once here, relative to the current directory at load time,
    so nothing later depends on the working directory.  Every problem is reported, in
    one ConfigError.
    """
    cfg, problems = _checked(cfg, source=source, is_keyword=is_keyword)
    _raise_if(problems, source)
    return cfg


def _checked(
    cfg: Config,
    *,
    source: str,
    refused: set[str] | frozenset[str] = frozenset(),
    is_keyword: Callable[[str], bool] | None = None,
) -> tuple[Config, list[str]]:
    """``validate``'s checks, returning the problems.

    Keys in ``refused`` already had a bad value (the default stands in for it here):
    the checks that involve them are skipped, so that no problem is reported about a
    value the file does not hold.
    """
    problems: list[str] = []

    def ok(*keys: str) -> bool:
        return not refused.intersection(keys)

    for key, choices in _CHOICES.items():
        value = getattr(cfg, key)
        if ok(key) and value not in choices:
            problems.append(
                f"{key}: {value!r} is not one of {', '.join(choices)}"
                f"{_did_you_mean(str(value), choices)}"
            )
    for key, (minimum, strict) in _MINIMUMS.items():
        value = getattr(cfg, key)
        if ok(key) and (value < minimum or (strict and value == minimum)):
            rel = ">" if strict else ">="
            problems.append(f"{key}: must be {rel} {minimum}, got {value!r}")
    if (
        ok("retry_max_seconds", "retry_initial_seconds")
        and cfg.retry_max_seconds < cfg.retry_initial_seconds
    ):
        problems.append("retry_max_seconds must be >= retry_initial_seconds")
    if cfg.node_id and not all(c.isalnum() or c in "-_." for c in cfg.node_id):
        problems.append("node_id: only letters, digits, '-', '_' and '.' are allowed")
    elif cfg.node_id in (".", ".."):
        # it names a folder: '.' or '..' would be the claims folder itself or its parent
        problems.append(f"node_id: {cfg.node_id!r} cannot name a folder")

    if ok("template"):
        try:
            check_template(cfg.template, is_keyword=is_keyword)
        except ConfigError as exc:
            problems.append(f"template: {exc}")

    def absolute(path: Path) -> Path:
        return Path(os.path.abspath(path))

    cfg = replace(
        cfg,
        inbox=absolute(cfg.inbox),
        archive=absolute(cfg.archive),
        quarantine=absolute(cfg.quarantine),
        processed=absolute(cfg.processed),
        state_dir=absolute(cfg.state_dir),
    )
    if ok(*_PATH_KEYS, "after_filing"):
        problems += _folder_relation_problems(cfg)
    if ok("index", "state_dir", "inbox"):
        problems += _index_problems(cfg)
    return cfg, problems


def check_template(template: str, *, is_keyword: Callable[[str], bool] | None = None) -> None:
    """Raise ConfigError if ``template`` would not render; an unknown keyword gets a hint."""
    suggest: Callable[[str], str | None] = _no_suggestion
    if is_keyword is None:
        from dicomwatch import dicomio

        is_keyword = dicomio.is_known_keyword
        suggest = dicomio.suggest_keyword
    try:
        compile_template(template, is_keyword=is_keyword)
    except ConfigError as exc:
        message = str(exc)
        for word in _unknown_words(template, is_keyword):
            better = suggest(word)
            if better:
                message += f" (did you mean {better!r}?)"
                break
        raise ConfigError(message) from exc


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


def _folder_relation_problems(cfg: Config) -> list[str]:
    """The inbox must not overlap any output folder, or the daemon would eat its own output.

    Both the paths as written and with symlinks followed are compared: a symlink must
    not hide an archive inside the inbox.
    """
    real = {key: Path(os.path.realpath(getattr(cfg, key))) for key in _PATH_KEYS}

    def inside(a: str, b: str) -> bool:
        return _inside(getattr(cfg, a), getattr(cfg, b)) or _inside(real[a], real[b])

    problems: list[str] = []
    outputs = ["archive", "quarantine"]
    if cfg.after_filing == "move":
        outputs.append("processed")
    for key in outputs:
        out = getattr(cfg, key)
        if inside("inbox", key):
            problems.append(f"inbox {cfg.inbox} is equal to or inside {key} {out}")
        elif inside(key, "inbox"):
            problems.append(f"{key} {out} is inside the inbox {cfg.inbox}")
    if cfg.archive == cfg.quarantine or real["archive"] == real["quarantine"]:
        problems.append("archive and quarantine must be different folders")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is a problem.

    Plain PyYAML keeps the last value silently: a file that sets ``inbox:`` near the top
    and again further down would run on the second without a word.  Every duplicate is
    recorded with both lines; ``<<`` merge keys are YAML's own override and stay allowed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if first is None:
                seen[key] = key_node.start_mark.line
            else:
                self.duplicates.append(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first on line {first + 1}; each key may appear once)"
                )
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> tuple[Any, list[str]]:
    """The document and the duplicate keys in it; a syntax error is a ConfigError."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> ConfigError:
    """Name the file and the line: PyYAML's own text names ``"<unicode string>"``."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "syntax error"
        context = exc.context_mark
        if exc.context and context is not None and context.line != mark.line:
            what += (
                f" ({exc.context.removeprefix('while ')} that starts on line "
                f"{context.line + 1}, column {context.column + 1})"
            )
        return ConfigError(
            f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}"
        )
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return ConfigError(
            f"{path}: line {line}: not valid YAML: character {exc.character!r}: {exc.reason}"
        )
    return ConfigError(f"{path}: not valid YAML: {exc}")  # pragma: no cover - no others


def _index_problems(cfg: Config) -> list[str]:
    if cfg.index not in ("sqlite", "none") and not cfg.index.startswith(
        ("postgresql://", "postgres://")
    ):
        return [f"index: {cfg.index!r} is not sqlite, none or a postgresql:// URL"]
    if cfg.index == "sqlite" and (
        _inside(cfg.state_dir, cfg.inbox)
        or _inside(Path(os.path.realpath(cfg.state_dir)), Path(os.path.realpath(cfg.inbox)))
    ):
        return [f"state_dir {cfg.state_dir} is inside the inbox {cfg.inbox}"]
    return []


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
        raw, duplicates = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, text, exc) from exc
    if raw is None:
        raw = {}
    cfg, problems = _from_mapping(raw, str(path))
    _raise_if(duplicates + problems, str(path))
    assert cfg is not None
    return cfg


def prepare_folders(cfg: Config, *, create: bool = True, include_inbox: bool = True) -> None:
    """Create the folders and prove they are writable before any file is touched.

    Failing here (exit 78) is kinder than failing every file later with EACCES.  What
    may be created depends on ``create_folders``:

    - true: any missing folder, with its parents;
    - false: never the inbox (a missing inbox is usually an unmounted share or a typo,
      and an empty local folder in its place would be watched forever with nothing
      ever arriving), and an output folder only where its parent exists: a parent
      that is there shows the place is the intended one (the folder that tmpfiles
      or the share provides); a missing parent is the same warning sign as a missing
      inbox.

    Every folder is checked before any is created, and every problem is reported.
    With ``create=False`` (check-config) nothing is created: the checks say whether
    ``run`` would be able to.
    """
    keys = list(_PATH_KEYS[1:] if not include_inbox else _PATH_KEYS)
    if cfg.after_filing != "move" and "processed" in keys:
        keys.remove("processed")
    problems: list[str] = []
    missing: list[tuple[str, Path]] = []
    for key in keys:
        folder: Path = getattr(cfg, key)
        if os.path.lexists(folder):
            if not folder.is_dir():
                problems.append(f"{key}: cannot create {folder}: something else is in the way")
            elif not os.access(folder, os.W_OK | os.X_OK):
                problems.append(f"{key}: {folder} is not writable by this user")
            continue
        if key == "inbox" and not cfg.create_folders:
            problems.append(
                f"inbox: {folder} does not exist (is its share mounted?); create it, "
                "or set create_folders: true to have dicomwatch create it"
            )
            continue
        parent = folder.parent
        if cfg.create_folders:
            while not os.path.lexists(parent) and parent != parent.parent:
                parent = parent.parent
        elif not os.path.lexists(parent):
            problems.append(
                f"{key}: {folder} does not exist, nor does its parent {parent} (is its "
                "share mounted?); create it, or set create_folders: true to have "
                "dicomwatch create both"
            )
            continue
        if not create and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
            # check-config before the first run: fine if ``run`` will be able to create it.
            problems.append(
                f"{key}: {folder} does not exist and cannot be created "
                f"({parent} is not a writable folder)"
            )
            continue
        missing.append((key, folder))
    if problems or not create:
        _raise_lines(problems)
        return
    for key, folder in missing:
        try:
            folder.mkdir(parents=cfg.create_folders, exist_ok=True)
        except OSError as exc:
            problems.append(f"{key}: cannot create {folder}: {exc.strerror or exc}")
            continue
        # INFO: making ./archive is what ``sort SRC --archive new`` is asked to do.
        log.info(
            "created the %s folder %s%s",
            key,
            folder,
            " (create_folders: true)" if cfg.create_folders else " (its parent exists)",
        )
        if not os.access(folder, os.W_OK | os.X_OK):  # pragma: no cover - a hostile umask
            problems.append(f"{key}: {folder} is not writable by this user")
    _raise_lines(problems)


def _raise_lines(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


def _without_password(url: str) -> str:
    """A database URL with its password replaced, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def render_yaml(cfg: Config) -> str:
    """The effective configuration, as a config file would say it (no passwords)."""
    values = cfg.to_dict()
    values["index"] = _without_password(str(values.get("index", "")))
    text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != values:
        # PyYAML writes U+0085 (NEL) raw, and reading folds it to a space: escape instead
        text = yaml.safe_dump(values, sort_keys=False, allow_unicode=False)
    return text
