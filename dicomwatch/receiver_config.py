"""The ``receiver:`` section of the config file: settings of ``dicomwatch receive``.

Kept apart from :class:`dicomwatch.config.Config` because only the receiver reads it;
``config.py`` hands the section to :func:`receiver_from_mapping` so that a typo in it
fails ``check-config`` and ``run`` exactly like a typo anywhere else (exit 78).  This
module does not import pynetdicom: the watch daemon validates the section without
needing the network extra installed.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dicomwatch.config import Config, load_config
from dicomwatch.errors import ConfigError

SECTION = "receiver"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ReceiverConfig:
    """Every setting of the network receiver; the defaults listen on loopback only."""

    bind: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "DICOMWATCH"
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    max_associations: int = 10
    max_pdu: int = 16382
    network_timeout_seconds: float = 30.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_cert: bool = False

    @property
    def peer_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.allowed_peers)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def peer_allowed(self, host: str) -> bool:
        """Listed peers only; with no list, only this host (loopback) may connect."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not self.allowed_peers:
            return addr.is_loopback
        return any(addr.version == net.version and addr in net for net in self.peer_networks)

    def calling_ae_allowed(self, ae_title: str, host: str) -> bool:
        """Listed calling AE titles only; with no list, any title from loopback."""
        title = ae_title.strip()
        if self.allowed_calling_ae_titles:
            return title in self.allowed_calling_ae_titles
        return ReceiverConfig(allowed_peers=()).peer_allowed(host)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_FIELDS = {f.name: f for f in fields(ReceiverConfig)}
_AE_FORBIDDEN = set("\\") | {chr(c) for c in range(32)} | {chr(127)}


def _check_ae_title(key: str, value: str) -> str:
    """AE titles: 1-16 characters of the DICOM default repertoire, not only spaces."""
    title = value.strip()
    if not title or len(value) > 16 or any(c in _AE_FORBIDDEN or ord(c) > 126 for c in value):
        raise ConfigError(
            f"{key}: {value!r} is not an AE title (1-16 printable ASCII characters, no '\\')"
        )
    return title


def _coerce(key: str, value: Any) -> Any:
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
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(f"{key}: expected a positive number of seconds, got {value!r}")
        return number
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def receiver_from_mapping(raw: Any, *, source: str = "config") -> ReceiverConfig:
    """Build and validate the ``receiver:`` section; every problem names its key."""
    where = f"{source}: {SECTION}"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of key: value, got {raw!r}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from exc
    try:
        return _validate(ReceiverConfig(**values))
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from exc


def _validate(rc: ReceiverConfig) -> ReceiverConfig:
    try:
        ipaddress.ip_address(rc.bind)
    except ValueError:
        raise ConfigError(f"bind: {rc.bind!r} is not an IP address") from None
    if not 1 <= rc.port <= 65535:
        raise ConfigError(f"port: must be between 1 and 65535, got {rc.port}")
    title = _check_ae_title("ae_title", rc.ae_title)
    callers = tuple(
        _check_ae_title("allowed_calling_ae_titles", t) for t in rc.allowed_calling_ae_titles
    )
    for peer in rc.allowed_peers:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError:
            raise ConfigError(
                f"allowed_peers: {peer!r} is not an IP address or network (CIDR)"
            ) from None
    if rc.max_associations < 1:
        raise ConfigError(f"max_associations: must be >= 1, got {rc.max_associations}")
    if rc.max_pdu != 0 and not 4096 <= rc.max_pdu <= 2**32 - 1:
        raise ConfigError(f"max_pdu: 0 (no limit) or 4096 to 4294967295 bytes, got {rc.max_pdu}")
    if bool(rc.tls_cert) != bool(rc.tls_key):
        raise ConfigError("tls_cert: tls_cert and tls_key go together (give both or neither)")
    if rc.tls_require_client_cert and not rc.tls_ca:
        raise ConfigError("tls_require_client_cert: needs tls_ca to check client certificates")
    if (rc.tls_ca or rc.tls_require_client_cert) and not rc.tls_cert:
        raise ConfigError("tls_ca: client certificates are only checked with TLS on (tls_cert)")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(rc, key)
        if value and not Path(value).is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
    return replace(rc, ae_title=title, allowed_calling_ae_titles=callers)


def load(path: Path | None) -> tuple[Config, ReceiverConfig]:
    """The whole config (validated as ``run`` would) and its ``receiver:`` section."""
    cfg = load_config(path)
    if path is None:
        return cfg, ReceiverConfig()
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return cfg, receiver_from_mapping(raw.get(SECTION), source=str(path))
