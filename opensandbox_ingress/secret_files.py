"""
Secrets that do not belong on the command line: the OSEP-0011 keys from a
file that is watched (keys rotate without a restart) and the Redis DSN
from a file or the environment.

A command line shows in C{ps}, in C{/proc/PID/cmdline} and in a Pod spec;
a mounted Secret does not.  Nothing here logs or reports a secret: errors
name the file, the line's position and the key id, never a value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import (
    DEFAULT_REDIS_DSN,
    ConfigError,
    IngressConfig,
    parse_redis_dsn,
    parse_secure_access_keys,
)
from .polling import PollingService
from .secure_access import KeyRing

KEYS_FILE_FLAG = "secure-access-keys-file"
DSN_FLAG = "renew-intent-redis-dsn"
DSN_FILE_FLAG = "renew-intent-redis-dsn-file"
#: The environment variable that carries the Redis DSN (e.g. from a
#: Secret through C{valueFrom.secretKeyRef}).
DSN_ENV = "OPENSANDBOX_INGRESS_RENEW_INTENT_REDIS_DSN"

#: Seconds between two looks at the keys file.  A Kubernetes Secret volume
#: is updated by the kubelet within about a minute; a second here is noise
#: next to that, and reading a small file once a second costs nothing.
KEYS_POLL_INTERVAL_S = 1.0


def parse_keys_text(text: str, flag: str = KEYS_FILE_FLAG) -> tuple[tuple[str, bytes], ...]:
    """
    Parse the contents of a keys file: the C{--secure-access-keys} syntax
    (C{id=BASE64} or C{id=base64:BASE64}), one key a line or several
    comma-separated; blank lines and C{#} comments are ignored.  A file
    without any key is refused (a truncated Secret must not turn
    verification off).

    @raise ConfigError: naming C{flag} and the bad segment, never its value.
    """
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    joined = ",".join(line.strip(",") for line in lines if line.strip(","))
    if not joined:
        raise ConfigError(flag, "the file holds no key")
    try:
        return parse_secure_access_keys(joined)
    except ConfigError as e:
        raise ConfigError(flag, e.problem) from None


def load_keys_file(path: str) -> tuple[tuple[str, bytes], ...]:
    """
    Read and parse the keys file at C{path}.

    @raise ConfigError: unreadable, not UTF-8, or not valid keys.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(KEYS_FILE_FLAG, f"{path}: cannot read: {e.strerror}") from None
    return _parse_keys_bytes(data, path)


def _parse_keys_bytes(data: bytes, path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(KEYS_FILE_FLAG, f"{path}: not UTF-8 text") from None
    try:
        return parse_keys_text(text)
    except ConfigError as e:
        raise ConfigError(KEYS_FILE_FLAG, f"{path}: {e.problem}") from None


class KeysFileWatcher(PollingService):
    """
    Re-reads C{--secure-access-keys-file} every L{KEYS_POLL_INTERVAL_S} and
    puts the keys into a L{KeyRing} when the contents change.

    The whole file is compared, not its mtime: a Kubernetes Secret volume
    swaps a symlink, and an editor may rewrite a file within the same
    mtime tick.  A file that cannot be read or parsed keeps the last good
    keys and is logged once per distinct problem (a problem names the file
    and what is wrong, never a secret).

    Ownership: reactor thread (a C{LoopingCall} on the injected clock).
    """

    _log = Logger()
    rejected_format = "secure-access keys file rejected, keeping the last good keys: {problem}"

    def __init__(
        self,
        clock: IReactorTime,
        ring: KeyRing,
        path: str,
        interval_s: float = KEYS_POLL_INTERVAL_S,
    ) -> None:
        super().__init__(clock, interval_s)
        self._ring = ring
        self._path = path
        #: The bytes last examined (good or bad); None after a read error.
        self._seen: bytes | None = None
        #: Successful reloads (rejected versions: C{failures}), for tests
        #: and metrics.
        self.reloads = 0

    def load_now(self) -> None:
        """
        Read the file and fill the ring, or raise L{ConfigError}: the
        start-up read, where a broken file must stop the ingress.
        """
        self._ring.replace(load_keys_file(self._path))
        # The first check (at start) reads it again and logs the key ids:
        # a change between the two reads is picked up, never missed.
        self._seen = None

    def check(self) -> None:
        """Look at the file once; reload the ring if its contents changed."""
        try:
            with open(self._path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._seen = None
            self.rejected(f"{self._path}: cannot read: {e.strerror}")
            return
        if data == self._seen:
            return
        self._seen = data
        try:
            keys = _parse_keys_bytes(data, self._path)
        except ConfigError as e:
            self.rejected(e.problem)
            return
        self._ring.replace(keys)
        self.reloads += 1
        self.accepted()
        self._log.info(
            "secure-access keys loaded from {path}: key ids {ids}",
            path=self._path,
            ids=",".join(sorted(self._ring)),
        )


def resolve_redis_dsn(
    flag_value: str | None,
    file_path: str | None,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """
    The Redis DSN, from (first given) C{--renew-intent-redis-dsn},
    C{--renew-intent-redis-dsn-file}, the environment variable L{DSN_ENV},
    else L{DEFAULT_REDIS_DSN}.  The flag and the file together are refused.
    A DSN from the file or the environment is validated here, and an error
    names where it came from without repeating it.

    @raise ConfigError: both flags, an unreadable or empty file, a bad DSN.
    """
    if flag_value is not None and file_path is not None:
        raise ConfigError(
            DSN_FILE_FLAG, f"give --{DSN_FLAG} or --{DSN_FILE_FLAG}, not both"
        )
    if flag_value is not None:
        return flag_value
    source: str
    if file_path is not None:
        source = DSN_FILE_FLAG
        try:
            with open(file_path, encoding="utf-8") as f:
                dsn = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(source, f"{file_path}: cannot read: {reason}") from None
        if not dsn:
            raise ConfigError(source, f"{file_path}: the file is empty")
    else:
        dsn = environ.get(DSN_ENV, "").strip()
        if not dsn:
            return DEFAULT_REDIS_DSN
        source = DSN_FLAG
    try:
        parse_redis_dsn(dsn)
    except ConfigError as e:
        where = f"{file_path}" if file_path is not None else f"${DSN_ENV}"
        raise ConfigError(source, f"{where}: {e.problem}") from None
    return dsn


def keys_watcher_for(
    config: IngressConfig, ring: KeyRing, clock: IReactorTime
) -> KeysFileWatcher | None:
    """
    The watcher of C{config.secure_access_keys_file} with the ring loaded
    (or None without the flag).

    @raise ConfigError: the file is unusable at start-up.
    """
    path = config.secure_access_keys_file
    if not path:
        return None
    watcher = KeysFileWatcher(clock, ring, path)
    watcher.load_now()
    return watcher
