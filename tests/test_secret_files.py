"""
Secrets off the command line: the keys file (parsing, the watcher on a
fake clock) and where the Redis DSN comes from.  The end-to-end rotation
and DSN tests on a running ingress are in test_secret_files_e2e.py.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from opensandbox_ingress.config import DEFAULT_REDIS_DSN, ConfigError, IngressConfig
from opensandbox_ingress.options import IngressOptions, config_from_options
from opensandbox_ingress.secret_files import (
    DSN_ENV,
    KeysFileWatcher,
    load_keys_file,
    parse_keys_text,
    resolve_redis_dsn,
)
from opensandbox_ingress.secure_access import KeyRing

SECRET_A = b"secret-a-\x00\xff"
SECRET_B = b"secret-b"
A = base64.b64encode(SECRET_A).decode()
B = base64.b64encode(SECRET_B).decode()


def write(path: Path, text: str) -> None:
    """Replace C{path} atomically, as a Secret volume update does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize(
    "text",
    [
        f"a={A}\nb={B}\n",
        f"# rotated 2025-01-01\na={A}\n\n  b=base64:{B}  # the new one\n",
        f"a={A},b={B}",
        f"a={A},\nb={B}\n",
    ],
    ids=["lines", "comments-and-prefix", "one-line-commas", "mixed"],
)
def test_keys_file_syntax(text: str) -> None:
    """The flag's syntax, one key a line or comma-separated, with comments and blank lines."""
    assert parse_keys_text(text) == (("a", SECRET_A), ("b", SECRET_B))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "the file holds no key"),
        ("# only a comment\n\n", "the file holds no key"),
        (f"A={A}\n", "segment 1 (key id 'A'): key id must be one character of [0-9a-z]"),
        (f"a={A}\nb=not*base64{B}\n", "segment 2 (key id 'b'): secret is not valid base64"),
        (f"a={A}\na={B}\n", "segment 2 (key id 'a'): key id 'a' given twice"),
    ],
    ids=["empty", "comments-only", "uppercase-id", "bad-base64", "twice"],
)
def test_bad_keys_file_names_the_flag_never_the_secret(text: str, problem: str) -> None:
    """A bad file is one ConfigError naming --secure-access-keys-file and the segment, without values."""
    with pytest.raises(ConfigError) as info:
        parse_keys_text(text)
    assert str(info.value) == f"--secure-access-keys-file: {problem}"
    assert A not in str(info.value) and B not in str(info.value)


def test_load_keys_file_errors_name_the_path(tmp_path: Path) -> None:
    """Missing and non-UTF-8 files are one line naming the flag and the path."""
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=f"^--secure-access-keys-file: {missing}: cannot read: "):
        load_keys_file(str(missing))
    binary = tmp_path / "binary"
    binary.write_bytes(b"a=\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_keys_file(str(binary))


def _errors(events: list[dict[str, object]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]


def test_watcher_rotates_keys_and_keeps_the_last_good_ones(tmp_path: Path) -> None:
    """Add a key, remove one, break the file (kept, logged once), fix it: each seen at the next poll."""
    path = tmp_path / "keys"
    write(path, f"a={A}\n")
    clock = Clock()
    ring = KeyRing()
    watcher = KeysFileWatcher(clock, ring, str(path), interval_s=1.0)
    watcher.load_now()
    assert dict(ring) == {"a": SECRET_A}
    with capturedLogs() as events:
        watcher.startService()
        try:
            write(path, f"a={A}\nb={B}\n")
            clock.advance(1)
            assert dict(ring) == {"a": SECRET_A, "b": SECRET_B}
            write(path, f"b={B}\n")
            clock.advance(1)
            assert dict(ring) == {"b": SECRET_B}

            write(path, f"b={B}\nc=***\n")
            for _ in range(5):
                clock.advance(1)
            assert dict(ring) == {"b": SECRET_B}
            path.unlink()
            for _ in range(5):
                clock.advance(1)
            assert dict(ring) == {"b": SECRET_B}
            write(path, f"b={B}\nc=***\n")  # the same problem again, after another
            clock.advance(1)

            write(path, f"c={A}\n")
            clock.advance(1)
            assert dict(ring) == {"c": SECRET_A}
        finally:
            watcher.stopService()
    errors = _errors(events)
    assert len(errors) == 3, errors  # once per distinct problem, not once per poll
    assert "secret is not valid base64" in errors[0] and "keeping the last good keys" in errors[0]
    assert "cannot read" in errors[1]
    text = "\n".join(formatEvent(e) for e in events)
    assert "key ids a,b" in text and "key ids c" in text
    assert A not in text and B not in text
    # An unchanged broken file is not parsed again; each failed read counts.
    assert watcher.reloads == 4 and watcher.failures == 1 + 5 + 1


def test_ring_repr_shows_ids_only() -> None:
    """A KeyRing in a log line or a traceback shows key ids, never secrets."""
    ring = KeyRing([("a", SECRET_A)])
    assert repr(ring) == "<KeyRing ids=['a']>"
    config = IngressConfig(secure_access_keys=(("a", SECRET_A),))
    assert "secret" not in repr(config)


# -- the Redis DSN ----------------------------------------------------------------------


def test_dsn_sources_and_precedence(tmp_path: Path) -> None:
    """Flag, else file, else environment, else the default; flag and file together refused."""
    path = tmp_path / "dsn"
    path.write_text("redis://u:from-file@10.0.0.1:6380/2\n")
    env = {DSN_ENV: "redis://u:from-env@10.0.0.2:6379/0"}
    assert resolve_redis_dsn(None, None, {}) == DEFAULT_REDIS_DSN
    assert resolve_redis_dsn(None, None, env) == env[DSN_ENV]
    assert resolve_redis_dsn(None, str(path), env) == "redis://u:from-file@10.0.0.1:6380/2"
    assert resolve_redis_dsn("redis://flag:6379/0", None, env) == "redis://flag:6379/0"
    with pytest.raises(ConfigError, match="^--renew-intent-redis-dsn-file: give .* not both$"):
        resolve_redis_dsn("redis://flag:6379/0", str(path), env)


@pytest.mark.parametrize(
    "content, env, flag, problem",
    [
        ("", None, "renew-intent-redis-dsn-file", "the file is empty"),
        ("http://u:pw-secret@h/0", None, "renew-intent-redis-dsn-file", "scheme must be"),
        (None, "http://u:pw-secret@h/0", "renew-intent-redis-dsn", f"${DSN_ENV}: scheme must be"),
    ],
    ids=["empty-file", "bad-file", "bad-env"],
)
def test_bad_dsn_names_its_source_not_its_password(
    tmp_path: Path, content: str | None, env: str | None, flag: str, problem: str
) -> None:
    """A DSN from a file or the environment that does not parse: one line, no password."""
    path = tmp_path / "dsn"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        resolve_redis_dsn(None, str(path) if content is not None else None, {DSN_ENV: env or ""})
    text = str(info.value)
    assert text.startswith(f"--{flag}: ") and problem in text
    assert "pw-secret" not in text


def test_options_read_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line takes both files; a broken keys file stops parsing with its flag."""
    monkeypatch.delenv(DSN_ENV, raising=False)
    keys, dsn = tmp_path / "keys", tmp_path / "dsn"
    write(keys, f"a={A}\n")
    dsn.write_text("redis://u:pw@127.0.0.1:6379/0")
    options = IngressOptions()
    options.parseOptions(
        [f"--secure-access-keys-file={keys}", f"--renew-intent-redis-dsn-file={dsn}"]
    )
    config = config_from_options(options)
    assert config.secure_access_keys_file == str(keys)
    assert config.secure_access_keys == ()
    assert config.renew_intent.redis_dsn == "redis://u:pw@127.0.0.1:6379/0"
    assert "pw" not in repr(config.renew_intent)

    write(keys, "a=***\n")
    options = IngressOptions()
    options.parseOptions([f"--secure-access-keys-file={keys}"])
    with pytest.raises(ConfigError, match="^--secure-access-keys-file: "):
        config_from_options(options)
    options = IngressOptions()
    options.parseOptions([f"--secure-access-keys-file={keys}", f"--secure-access-keys=a={A}"])
    with pytest.raises(ConfigError, match="not both"):
        config_from_options(options)
