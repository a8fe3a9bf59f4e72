"""
The typed, validated configuration of one ingress.

L{IngressConfig} is a frozen value built once (from the command line by
L{opensandbox_ingress.options}, or directly by an embedding program) and
handed to everything else.  Validation lives here, so every way of building a
configuration gets the same clear errors: L{ConfigError} names the flag.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from .config_error import ConfigError
from .sources.providers import DEFAULT_PROVIDER, provider_named

RouteMode = Literal["header", "uri"]
LogLevel = Literal["debug", "info", "warn", "error"]
LogFormat = Literal["text", "json"]

ROUTE_MODES: tuple[str, ...] = ("header", "uri")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")

DEFAULT_PORT = 28888
DEFAULT_NAMESPACE = "opensandbox"
DEFAULT_REDIS_DSN = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE_KEY = "opensandbox:renew:intent"

_KEY_ID = re.compile(r"[0-9a-z]")


@dataclass(frozen=True)
class RenewIntentConfig:
    """Settings of the OSEP-0009 renew-intent publisher."""

    enabled: bool = False
    #: May carry a password: kept out of C{repr} (and so out of any log of
    #: the configuration).
    redis_dsn: str = field(default=DEFAULT_REDIS_DSN, repr=False)
    queue_key: str = DEFAULT_QUEUE_KEY
    #: LTRIM the list to this many entries after each push; 0 = no cap.
    queue_max_len: int = 0
    #: Seconds between two intents for the same sandbox.
    min_interval_s: float = 60.0
    #: Keep the per-sandbox throttle in Redis, shared by every replica and
    #: worker (L{opensandbox_ingress.shared_throttle}).
    shared_throttle: bool = False


@dataclass(frozen=True)
class IngressConfig:
    """
    Everything one ingress instance needs to know, validated.

    Build it with keyword arguments and call L{validate} (the options parser
    and L{opensandbox_ingress.build_ingress} both do).
    """

    namespace: str = DEFAULT_NAMESPACE
    all_namespaces: bool = False
    #: A row of L{opensandbox_ingress.sources.providers.PROVIDERS}.
    provider_type: str = DEFAULT_PROVIDER
    mode: RouteMode = "header"
    #: Twisted server endpoint strings of the proxy listeners.
    listen: tuple[str, ...] = (f"tcp:{DEFAULT_PORT}",)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    #: OSEP-0011 verification keys: key id (one character) -> secret.
    secure_access_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    #: A file of OSEP-0011 keys (same syntax, one a line), re-read when it
    #: changes; exclusive with C{secure_access_keys}.
    secure_access_keys_file: str | None = None
    renew_intent: RenewIntentConfig = field(default_factory=RenewIntentConfig)
    sandboxes_file: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    #: Endpoint strings of the admin listener (metrics, routing view).
    admin_listen: tuple[str, ...] = ()
    #: Seconds to establish a TCP connection to a backend.
    upstream_connect_timeout_s: float = 10.0
    #: Seconds without any byte moving before a client or upstream
    #: connection is closed; 0 = never.
    idle_timeout_s: float = 300.0
    #: Seconds a client may take to send a request's headers (counted from
    #: accept for the first request, from its first byte for later ones).
    header_timeout_s: float = 30.0
    #: Bytes a request head (start line and header lines) may take; a
    #: larger one is answered 431.
    max_header_bytes: int = 16384
    #: Seconds between WebSocket keep-alive pings on both hops; 0 = off.
    websocket_ping_interval_s: float = 30.0
    #: Negotiate permessage-deflate with clients that offer it (the backend
    #: hop is never compressed).
    websocket_compression: bool = True
    #: Bytes a WebSocket message may carry (inflated, when compressed); a
    #: larger one fails its sender with 1009.  0 = no limit.
    websocket_max_message_bytes: int = 0
    #: Seconds a request for a not-ready sandbox waits for it; 0 = answer 503.
    ready_wait_s: float = 0.0
    #: Seconds a graceful shutdown may take before connections are cut.
    shutdown_timeout_s: float = 30.0
    workers: int = 1
    #: The backend receives the client's C{Host} instead of
    #: C{{endpoint}:{port}} (browser apps compare C{Origin} with C{Host}).
    preserve_host: bool = False
    #: URI mode: the backend receives the whole path C{/{id}/{port}/{rest}}
    #: (signed segments removed) and C{Location} is not rebased, for apps
    #: served under that base URL.
    uri_keep_prefix: bool = False

    def validate(self) -> IngressConfig:
        """
        Check every value; return C{self} or raise L{ConfigError}.
        """
        # Raises ConfigError naming the choices when the name is unknown.
        provider = provider_named(self.provider_type)
        if self.mode not in ROUTE_MODES:
            raise ConfigError(
                "mode", f"unknown mode {self.mode!r}; expected header or uri"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                "log-level",
                f"unknown level {self.log_level!r}; "
                f"expected one of {', '.join(LOG_LEVELS)}",
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                "log-format",
                f"unknown format {self.log_format!r}; expected text or json",
            )
        if not self.all_namespaces and not _is_dns_label(self.namespace):
            raise ConfigError(
                "namespace", f"{self.namespace!r} is not a valid namespace name"
            )
        if not self.listen:
            raise ConfigError("listen", "at least one listener is required")
        if self.secure_access_keys and self.secure_access_keys_file:
            raise ConfigError(
                "secure-access-keys-file",
                "give --secure-access-keys or --secure-access-keys-file, not both",
            )
        provider.check_settings(self)
        for name, value in (
            ("upstream-connect-timeout", self.upstream_connect_timeout_s),
            ("header-timeout", self.header_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(name, f"must be > 0 seconds, got {value}")
        for name, value in (
            ("idle-timeout", self.idle_timeout_s),
            ("websocket-ping-interval", self.websocket_ping_interval_s),
            ("ready-wait", self.ready_wait_s),
            ("shutdown-timeout", self.shutdown_timeout_s),
        ):
            if not value >= 0:
                raise ConfigError(name, f"must be >= 0 seconds, got {value}")
        if self.max_header_bytes < 1024:
            raise ConfigError(
                "max-header-bytes", f"must be >= 1024, got {self.max_header_bytes}"
            )
        if self.websocket_max_message_bytes < 0:
            raise ConfigError(
                "websocket-max-message-bytes",
                f"must be >= 0, got {self.websocket_max_message_bytes}",
            )
        if self.uri_keep_prefix and self.mode != "uri":
            raise ConfigError("uri-keep-prefix", "only applies with --mode uri")
        if self.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {self.workers}")
        renew = self.renew_intent
        parse_redis_dsn(renew.redis_dsn)
        if not renew.queue_key:
            raise ConfigError("renew-intent-queue-key", "must not be empty")
        if renew.queue_max_len < 0:
            raise ConfigError(
                "renew-intent-queue-max-len",
                f"must be >= 0, got {renew.queue_max_len}",
            )
        if not renew.min_interval_s >= 0:
            raise ConfigError(
                "renew-intent-min-interval",
                f"must be >= 0 seconds, got {renew.min_interval_s}",
            )
        return self


def _is_dns_label(name: str) -> bool:
    return re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name) is not None


def parse_port(text: str, flag: str = "port") -> int:
    """Parse a TCP port in 1..65535 or raise L{ConfigError}."""
    # isascii: str.isdigit() also accepts digits int() refuses (e.g. "²");
    # the length bound keeps int() away from its huge-string limit.
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 1 <= int(text) <= 65535:
        raise ConfigError(flag, f"{text!r} is not a port in 1..65535")
    return int(text)


def parse_seconds(text: str, flag: str) -> float:
    """Parse a non-negative number of seconds or raise L{ConfigError}."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(flag, f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(flag, f"{text!r} must be a finite number >= 0")
    return value


def parse_on_off(text: str, flag: str) -> bool:
    """Parse C{on} or C{off} (any case) or raise L{ConfigError}."""
    value = text.strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(flag, f"{text!r} is not on or off")
    return value == "on"


def parse_int(text: str, flag: str, minimum: int = 0) -> int:
    """Parse an integer >= C{minimum} or raise L{ConfigError}."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(flag, f"{text!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(flag, f"{text!r} must be >= {minimum}")
    return value


def parse_secure_access_keys(text: str) -> tuple[tuple[str, bytes], ...]:
    """
    Parse C{--secure-access-keys}: comma-separated C{id=BASE64} or
    C{id=base64:BASE64}; the id is one character of C{[0-9a-z]}; the
    decoded secret is non-empty.  Raises L{ConfigError} naming the bad
    segment.
    """
    flag = "secure-access-keys"
    keys: dict[str, bytes] = {}
    if not text.strip():
        return ()
    for index, segment in enumerate(text.split(","), start=1):
        segment = segment.strip()
        # Name the segment by position and key id only: the rest is secret,
        # and a failed start's error line ends up in the logs.
        where = f"segment {index}"
        if not segment:
            raise ConfigError(flag, f"segment {index} is empty")
        key_id, sep, encoded = segment.partition("=")
        if not sep:
            raise ConfigError(flag, f"{where} is not id=BASE64")
        key_id = key_id.strip()
        if len(key_id) == 1:
            where = f"segment {index} (key id {key_id!r})"
        if len(key_id) != 1 or not _KEY_ID.fullmatch(key_id):
            raise ConfigError(
                flag, f"{where}: key id must be one character of [0-9a-z]"
            )
        if key_id in keys:
            raise ConfigError(flag, f"{where}: key id {key_id!r} given twice")
        encoded = encoded.strip()
        if encoded.startswith("base64:"):
            encoded = encoded[len("base64:") :]
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(flag, f"{where}: secret is not valid base64") from None
        if not secret:
            raise ConfigError(flag, f"{where}: secret is empty")
        keys[key_id] = secret
    return tuple(sorted(keys.items()))


@dataclass(frozen=True)
class RedisDsn:
    """The parts of a Redis DSN that the publisher needs."""

    url: str
    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None


def parse_redis_dsn(dsn: str) -> RedisDsn:
    """
    Parse C{redis://[user:password@]host[:port][/db]} (or C{rediss://}) or
    raise L{ConfigError}.
    """
    flag = "renew-intent-redis-dsn"
    try:
        parts = urlsplit(dsn)
        port = parts.port
    except ValueError as e:
        raise ConfigError(flag, f"unparsable DSN: {e}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(flag, "scheme must be redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError(flag, "DSN has no host")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ConfigError(flag, f"database {path!r} is not a number")
    return RedisDsn(
        url=dsn,
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=port or 6379,
        db=int(path or 0),
        username=parts.username or None,
        password=parts.password,
    )
