"""The file provider (SPEC section 4.3): parsing and the polling source."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import provider

from opensandbox_ingress.errors import RegistryNotSynced
from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry
from opensandbox_ingress.sources.file import FileSource, SandboxFileError, parse_sandboxes

# -- parse_sandboxes ---------------------------------------------------------------


def _fields(records: list[SandboxRecord]) -> list[tuple[Any, ...]]:
    return [
        (r.name, r.namespace, r.endpoint, r.ready, r.not_ready_reason, r.secure_access_token)
        for r in records
    ]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (
            '[{"name": "a", "endpoint": "10.0.0.1"},'
            ' {"name": "b", "endpoint": "b.svc", "ready": false, "secure_access_token": "t"}]',
            "s.json",
        ),
        (
            "- name: a\n  endpoint: 10.0.0.1\n"
            "- name: b\n  endpoint: b.svc\n  ready: false\n  secure_access_token: t\n",
            "s.yaml",
        ),
        (
            "sandboxes:\n  - {name: a, endpoint: 10.0.0.1}\n"
            "  - {name: b, endpoint: b.svc, ready: false, secure_access_token: t}\n",
            "s.yml",
        ),
        (
            '{"sandboxes": [{"name": "a", "endpoint": "10.0.0.1"},'
            ' {"name": "b", "endpoint": "b.svc", "ready": false, "secure_access_token": "t"}]}',
            "s.json",
        ),
        # JSON in a file not named .json is read as YAML, which accepts it.
        (
            '[{"name": "a", "endpoint": "10.0.0.1"},'
            ' {"name": "b", "endpoint": "b.svc", "ready": false, "secure_access_token": "t"}]',
            "sandboxes",
        ),
    ],
)
def test_parse_formats(text: str, path: str) -> None:
    """JSON, YAML, and the 'sandboxes:' mapping form all give the same records."""
    assert _fields(parse_sandboxes(text, path)) == [
        ("a", "", "10.0.0.1", True, "", None),
        ("b", "", "b.svc", False, "marked not ready in the sandboxes file", "t"),
    ]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "a", "endpoint": "h"}, ("a", "", "h", True, "", None)),
        ({"name": " a ", "endpoint": " h "}, ("a", "", "h", True, "", None)),
        ({"name": "a", "endpoint": "h", "ready": True}, ("a", "", "h", True, "", None)),
        (
            {"name": "a"},
            ("a", "", None, False, "no endpoint in the sandboxes file", None),
        ),
        (
            {"name": "a", "endpoint": None, "ready": True},
            ("a", "", None, False, "no endpoint in the sandboxes file", None),
        ),
        (
            {"name": "a", "endpoint": "h", "secure_access_token": "  tok \n"},
            ("a", "", "h", True, "", "tok"),
        ),
        (
            {"name": "a", "endpoint": "h", "secure_access_token": "   "},
            ("a", "", "h", True, "", None),
        ),
        ({"name": "a", "endpoint": "h", "secure_access_token": ""}, ("a", "", "h", True, "", None)),
        (
            {"name": "a", "endpoint": "h", "secure_access_token": None},
            ("a", "", "h", True, "", None),
        ),
    ],
)
def test_parse_entry_defaults(entry: dict[str, Any], expected: tuple[Any, ...]) -> None:
    """ready defaults to true; names, endpoints and tokens are trimmed; blank tokens mean none."""
    assert _fields(parse_sandboxes(json.dumps([entry]), "s.json")) == [expected]


@pytest.mark.parametrize(
    ("text", "path"), [("", "s.yaml"), ("# nothing\n", "s.yaml"), ("[]", "s.json")]
)
def test_parse_empty(text: str, path: str) -> None:
    """An empty file or list means no sandboxes."""
    assert parse_sandboxes(text, path) == []


def test_generation_tracks_content() -> None:
    """A record's generation changes when its endpoint changes, and only then."""
    (a,) = parse_sandboxes('[{"name": "a", "endpoint": "h1"}]', "s.json")
    (same,) = parse_sandboxes("- {name: a, endpoint: h1, ready: true}", "s.yaml")
    (moved,) = parse_sandboxes('[{"name": "a", "endpoint": "h2"}]', "s.json")
    assert a.generation.startswith("file:")
    assert a == same
    assert moved.generation != a.generation


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("[1, ", "s.json", "s.json: not valid JSON/YAML"),
        ("name: [", "s.yaml", "s.yaml: not valid JSON/YAML"),
        ("- a: !!python/name:os.system", "s.yaml", "not valid JSON/YAML"),
        pytest.param("[" * 100_000, "s.json", "not valid JSON/YAML", id="deep-json"),
        pytest.param("[" * 100_000, "s.yaml", "not valid JSON/YAML", id="deep-yaml"),
        ('{"name": "a"}', "s.json", "s.json: expected a list of sandboxes"),
        ('"text"', "s.json", "expected a list of sandboxes"),
        ("sandboxes:\n", "s.yaml", "expected a list of sandboxes"),
        ("sandboxes: {a: b}\n", "s.yaml", "expected a list of sandboxes"),
        ("[1]", "s.json", "entry 0: expected a mapping"),
        ('[{"name": "a", "endpoint": "h"}, ["b"]]', "s.json", "entry 1: expected a mapping"),
        ('[{"name": "a", "host": "h"}]', "s.json", "entry 0: unknown field(s) host"),
        ("- {name: a, 8080: x, null: y}", "s.yaml", "entry 0: unknown field(s) 8080, None"),
        ('[{"endpoint": "h"}]', "s.json", "entry 0: 'name' must be a non-empty string"),
        ('[{"name": ""}]', "s.json", "entry 0: 'name' must be a non-empty string"),
        ('[{"name": "  "}]', "s.json", "entry 0: 'name' must be a non-empty string"),
        ('[{"name": 7}]', "s.json", "entry 0: 'name' must be a non-empty string"),
        (
            '[{"name": "a"}, {"name": " a "}]',
            "s.json",
            "entry 1: name 'a' appears twice",
        ),
        ('[{"name": "a", "endpoint": ""}]', "s.json", "entry 0 (a): 'endpoint' must be"),
        ('[{"name": "a", "endpoint": 10}]', "s.json", "entry 0 (a): 'endpoint' must be"),
        ('[{"name": "a", "ready": "yes"}]', "s.json", "entry 0 (a): 'ready' must be true or false"),
        ('[{"name": "a", "ready": 1}]', "s.json", "entry 0 (a): 'ready' must be true or false"),
        (
            '[{"name": "a", "secure_access_token": 5}]',
            "s.json",
            "entry 0 (a): 'secure_access_token' must be a string",
        ),
        (
            "sandboxes:\n  - {name: a, endpoint: h}\n  - {name: b, ready: maybe}\n",
            "s.yaml",
            "s.yaml: entry 1 (b): 'ready' must be true or false",
        ),
    ],
)
def test_parse_rejects(text: str, path: str, message: str) -> None:
    """Every malformed shape is a SandboxFileError naming the file, entry and field."""
    with pytest.raises(SandboxFileError) as e:
        parse_sandboxes(text, path)
    assert message in str(e.value)
    assert str(e.value).startswith(path)
    assert "\n" not in str(e.value)


# -- FileSource ------------------------------------------------------------------


@pytest.fixture
def errors_logged() -> Iterator[list[str]]:
    """Formatted error-level log events of the file source while the test runs."""
    events: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error and event.get("log_namespace", "").startswith(
            "opensandbox_ingress.sources.file"
        ):
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


class SandboxesFile:
    """A sandboxes file whose every write gets a distinct, later modification time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = 1_000_000_000_000_000_000

    def write(self, content: str | list[dict[str, Any]]) -> None:
        text = content if isinstance(content, str) else json.dumps(content)
        self.path.write_text(text, encoding="utf-8")
        # Coarse file-system timestamps could hide a quick rewrite of the
        # same size; tests must not depend on the clock tick.
        self._mtime_ns += 1_000_000_000
        os.utime(self.path, ns=(self._mtime_ns, self._mtime_ns))


@pytest.fixture
def sandboxes(tmp_path: Path) -> SandboxesFile:
    """A sandboxes file (not yet written) in a temporary directory."""
    return SandboxesFile(tmp_path / "sandboxes.json")


def _names(registry: SandboxRegistry) -> list[tuple[str, str | None]]:
    return [(r.name, r.endpoint) for r in registry.records()]


def test_first_load_syncs_registry(sandboxes: SandboxesFile) -> None:
    """Starting the source reads the file at once and syncs the registry."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    clock = Clock()
    registry = SandboxRegistry()
    source = FileSource(clock, registry, str(sandboxes.path))
    source.startService()
    try:
        assert registry.synced
        assert registry.lookup("a").endpoint == "10.0.0.1"
        assert (source.loads, source.failures) == (1, 0)
    finally:
        source.stopService()
    assert not clock.getDelayedCalls()


def test_change_is_reloaded_on_next_poll(sandboxes: SandboxesFile) -> None:
    """A changed file is re-read at the next poll; an unchanged one is not."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    clock = Clock()
    registry = SandboxRegistry()
    source = FileSource(clock, registry, str(sandboxes.path), poll_interval_s=2.0)
    source.startService()
    try:
        clock.advance(2.0)
        assert source.loads == 1
        sandboxes.write([{"name": "b", "endpoint": "10.0.0.2"}])
        clock.advance(1.0)
        assert _names(registry) == [("a", "10.0.0.1")]
        clock.advance(1.0)
        assert _names(registry) == [("b", "10.0.0.2")]
        assert source.loads == 2
    finally:
        source.stopService()


def test_same_size_rewrite_is_reloaded(sandboxes: SandboxesFile) -> None:
    """A rewrite of the same size is noticed (by modification time)."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    source.check()
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.2"}])
    source.check()
    assert _names(registry) == [("a", "10.0.0.2")]


def test_broken_file_keeps_last_good_state(
    sandboxes: SandboxesFile, errors_logged: list[str]
) -> None:
    """A broken file is rejected, the registry keeps its records, and the problem is logged."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    source.check()
    sandboxes.write('[{"name": "a", "endpoint": 5}]')
    source.check()
    assert _names(registry) == [("a", "10.0.0.1")]
    assert (source.loads, source.failures) == (1, 1)
    assert len(errors_logged) == 1
    assert "keeping the last good state" in errors_logged[0]
    assert "entry 0 (a): 'endpoint' must be a non-empty string" in errors_logged[0]


def test_problem_logged_once_per_distinct_problem(
    sandboxes: SandboxesFile, errors_logged: list[str]
) -> None:
    """The same problem is logged once however often it recurs; a new problem is logged."""
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    sandboxes.write("[1]")
    source.check()
    source.check()  # unchanged: not re-read
    sandboxes.write("[1]")  # re-written, same problem
    source.check()
    assert source.failures == 2
    assert len(errors_logged) == 1
    sandboxes.write("[2, 3]")  # different content, same problem
    source.check()
    assert len(errors_logged) == 1
    sandboxes.write('[{"name": 1}]')  # a different problem
    source.check()
    assert source.failures == 4
    assert len(errors_logged) == 2
    assert "'name' must be a non-empty string" in errors_logged[1]


def test_problem_logged_again_after_recovery(
    sandboxes: SandboxesFile, errors_logged: list[str]
) -> None:
    """After a good load, the same problem as before is logged again."""
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    sandboxes.write("[1]")
    source.check()
    sandboxes.write([])
    source.check()
    sandboxes.write("[1]")
    source.check()
    assert len(errors_logged) == 2


def test_missing_file_at_start_stays_unsynced(
    sandboxes: SandboxesFile, errors_logged: list[str]
) -> None:
    """A missing file at start keeps the registry unsynced, logged once; writing it syncs."""
    clock = Clock()
    registry = SandboxRegistry()
    source = FileSource(clock, registry, str(sandboxes.path))
    source.startService()
    try:
        clock.advance(1.0)
        clock.advance(1.0)
        assert not registry.synced
        with pytest.raises(RegistryNotSynced):
            registry.lookup("a")
        assert source.loads == 0
        assert source.failures == 3
        assert len(errors_logged) == 1
        assert "cannot read" in errors_logged[0]
        sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
        clock.advance(1.0)
        assert registry.synced
        assert registry.lookup("a").endpoint == "10.0.0.1"
    finally:
        source.stopService()


def test_broken_file_at_start_stays_unsynced_until_fixed(sandboxes: SandboxesFile) -> None:
    """A broken file at start keeps the registry unsynced until a good version appears."""
    sandboxes.write("{not json")
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    source.check()
    assert not registry.synced
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    source.check()
    assert registry.synced
    assert _names(registry) == [("a", "10.0.0.1")]


def test_deleted_file_keeps_last_good_state(sandboxes: SandboxesFile) -> None:
    """Deleting the file keeps the records; re-creating it reloads."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    registry = SandboxRegistry()
    source = FileSource(Clock(), registry, str(sandboxes.path))
    source.check()
    sandboxes.path.unlink()
    source.check()
    assert _names(registry) == [("a", "10.0.0.1")]
    sandboxes.write([{"name": "b", "endpoint": "10.0.0.2"}])
    source.check()
    assert _names(registry) == [("b", "10.0.0.2")]


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not utf-8",
        b"- {name: a, 8080: x}",
        pytest.param(b"[" * 100_000, id="deep-nesting"),
    ],
)
def test_poll_loop_survives_bad_content(sandboxes: SandboxesFile, content: bytes) -> None:
    """No file content stops the polling loop; a later good file still loads."""
    sandboxes.write([{"name": "a", "endpoint": "10.0.0.1"}])
    clock = Clock()
    registry = SandboxRegistry()
    source = FileSource(clock, registry, str(sandboxes.path))
    source.startService()
    try:
        sandboxes.path.write_bytes(content)
        os.utime(sandboxes.path, ns=(1, 1))
        clock.advance(1.0)
        assert source.failures == 1
        assert _names(registry) == [("a", "10.0.0.1")]
        sandboxes.write([{"name": "b", "endpoint": "10.0.0.2"}])
        clock.advance(1.0)
        assert _names(registry) == [("b", "10.0.0.2")]
    finally:
        source.stopService()


def test_yaml_file_is_read(tmp_path: Path) -> None:
    """A .yaml sandboxes file is read as YAML."""
    path = tmp_path / "sandboxes.yaml"
    path.write_text("sandboxes:\n  - name: a\n    endpoint: 10.0.0.1\n    ready: no\n")
    registry = SandboxRegistry()
    FileSource(Clock(), registry, str(path)).check()
    record = registry.lookup("a")
    assert (record.endpoint, record.ready) == ("10.0.0.1", False)


def test_stop_service_stops_polling(sandboxes: SandboxesFile) -> None:
    """After stopService no further polls are scheduled."""
    sandboxes.write([])
    clock = Clock()
    source = FileSource(clock, SandboxRegistry(), str(sandboxes.path))
    source.startService()
    assert clock.getDelayedCalls()
    source.stopService()
    assert not clock.getDelayedCalls()
    assert not source.running
