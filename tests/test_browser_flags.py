"""
C{--preserve-host} and C{--uri-keep-prefix}, through a real ingress on
loopback, with a raw backend that records the exact bytes it receives.

Each case runs on both HTTP engines of the proxy port: the lean fast path
(a plain HTTP/1.1 C{GET}) and C{twisted.web} (a chunked upload, which the
fast path hands over), and on the WebSocket relay's backend handshake.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from opensandbox_ingress import IngressService
from opensandbox_ingress.config import ConfigError, IngressConfig
from opensandbox_ingress.options import IngressOptions, config_from_options
from opensandbox_ingress.secure_access import sign
from tests.helpers import RawClient, raw_connect, start_ingress, wait_until
from tests.raw_backend import RawBackend

SECRET = b"k"
TOKEN = "tok-1"


def redirect(location: bytes) -> bytes:
    return b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"


def sandboxes(port: int) -> list[dict[str, Any]]:
    del port
    return [
        {"name": "nb", "endpoint": "127.0.0.1"},
        {"name": "sec", "endpoint": "127.0.0.1", "secure_access_token": TOKEN},
    ]


def ingress_port(service: IngressService) -> int:
    return int(service.addresses()[0].port)


# Two ways to send the same request: the fast path takes a plain GET; a
# chunked upload goes to twisted.web (README, "Behaviour").
ENGINES = ("fast", "twisted.web")


def request_bytes(engine: str, target: bytes, host: bytes, extra: bytes = b"") -> bytes:
    if engine == "fast":
        return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )


async def exchange(service: IngressService, data: bytes) -> RawClient:
    """Send C{data} on a fresh connection; wait for a whole response head."""
    client = await raw_connect(ingress_port(service))
    assert client.transport is not None
    client.transport.write(data)
    await wait_until(lambda: b"\r\n\r\n" in client.received, 10, "a response head")
    return client


def backend_head(backend: RawBackend) -> bytes:
    received = backend.received
    return received[: received.index(b"\r\n\r\n") + 4]


def header_values(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.split(b":", 1)[0].strip().lower() == name.lower()
    ]


def response_location(client: RawClient) -> list[bytes]:
    head = bytes(client.received).split(b"\r\n\r\n", 1)[0]
    return header_values(head, b"location")


@pytest_twisted.async_yield_fixture
async def backend() -> AsyncIterator[RawBackend]:
    raw = RawBackend(answer=redirect(b"/elsewhere"))
    yield raw
    await raw.port.stopListening()


async def start(tmp_path: Path, **overrides: Any) -> IngressService:
    return await start_ingress(tmp_path, sandboxes(0), **overrides)


# -- --preserve-host -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_preserve_host_sends_the_clients_host(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """With --preserve-host the backend gets the client's Host, once, and X-Forwarded-Host as before."""
    service = await start(tmp_path, preserve_host=True)
    try:
        port = backend.port.getHost().port
        host = b"nb-%d.localhost:4711" % port
        client = await exchange(service, request_bytes(engine, b"/lab?x=1", host))
        assert client.received.startswith(b"HTTP/1.1 302")
        head = backend_head(backend)
        assert head.startswith(b"%s /lab?x=1 HTTP/1.1\r\n" % (b"GET" if engine == "fast" else b"POST"))
        assert header_values(head, b"host") == [host]
        assert header_values(head, b"x-forwarded-host") == [host]
    finally:
        await service.stopService()


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_preserve_host_keeps_a_host_without_port(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """Routed by header, the backend still gets the client's Host as written (no port added)."""
    service = await start(tmp_path, preserve_host=True)
    try:
        port = backend.port.getHost().port
        route = b"OpenSandbox-Ingress-To: nb-%d\r\n" % port
        await exchange(service, request_bytes(engine, b"/", b"apps.example.com", route))
        head = backend_head(backend)
        assert header_values(head, b"host") == [b"apps.example.com"]
        assert header_values(head, b"opensandbox-ingress-to") == []
    finally:
        await service.stopService()


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_host_is_rewritten_by_default(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """Without the flag the backend gets {endpoint}:{port}, as the Go ingress sends."""
    service = await start(tmp_path)
    try:
        port = backend.port.getHost().port
        await exchange(service, request_bytes(engine, b"/", b"nb-%d.localhost:4711" % port))
        assert header_values(backend_head(backend), b"host") == [b"127.0.0.1:%d" % port]
    finally:
        await service.stopService()


# -- --uri-keep-prefix ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_uri_keep_prefix_forwards_the_whole_path(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """The backend gets /{id}/{port}/{rest}?query; Location is passed as the app wrote it."""
    service = await start(tmp_path, mode="uri", uri_keep_prefix=True)
    try:
        port = backend.port.getHost().port
        prefix = b"/nb/%d" % port
        backend.answer = redirect(prefix + b"/lab/tree")
        target = prefix + b"/lab/api/contents?content=1"
        client = await exchange(service, request_bytes(engine, target, b"ingress.test"))
        head = backend_head(backend)
        assert head.split(b"\r\n")[0].split(b" ")[1] == target
        assert header_values(head, b"x-forwarded-prefix") == [prefix]
        # Not rebased a second time: the app already wrote the prefix.
        assert response_location(client) == [prefix + b"/lab/tree"]
    finally:
        await service.stopService()


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_uri_mode_strips_and_rebases_by_default(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """Without the flag: /{rest} forwarded, a root-relative Location rebased (unchanged behaviour)."""
    service = await start(tmp_path, mode="uri")
    try:
        port = backend.port.getHost().port
        backend.answer = redirect(b"/lab/tree")
        client = await exchange(service, request_bytes(engine, b"/nb/%d/lab" % port, b"x"))
        assert backend_head(backend).split(b"\r\n")[0].split(b" ")[1] == b"/lab"
        assert response_location(client) == [b"/nb/%d/lab/tree" % port]
    finally:
        await service.stopService()


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_uri_keep_prefix_drops_signed_segments(
    tmp_path: Path, backend: RawBackend, engine: str
) -> None:
    """A signed route to a secure sandbox forwards /{id}/{port}/{rest}: the signature never reaches the app."""
    service = await start(
        tmp_path, mode="uri", uri_keep_prefix=True, secure_access_keys=(("a", SECRET),)
    )
    try:
        port = backend.port.getHost().port
        part = sign(SECRET, "a", "sec", port, int(time.time()) + 600)
        signed = f"/sec/{port}/{part.expires_b36}/{part.signature}".encode()
        client = await exchange(service, request_bytes(engine, signed + b"/lab?x=1", b"x"))
        assert client.received.startswith(b"HTTP/1.1 302"), bytes(client.received)
        head = backend_head(backend)
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"/sec/%d/lab?x=1" % port
        assert part.signature.encode() not in head.split(b"\r\n")[0]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_uri_keep_prefix_keeps_signature_shaped_path_of_open_sandbox(
    tmp_path: Path, backend: RawBackend
) -> None:
    """For a sandbox without secure access, signature-shaped segments are just path and stay."""
    service = await start(tmp_path, mode="uri", uri_keep_prefix=True)
    try:
        port = backend.port.getHost().port
        target = b"/nb/%d/x2qxvk/614adedea/file" % port
        await exchange(service, request_bytes("fast", target, b"x"))
        assert backend_head(backend).split(b"\r\n")[0].split(b" ")[1] == target
    finally:
        await service.stopService()


# -- the WebSocket relay's backend handshake ----------------------------------------------


def upgrade(target: bytes, host: bytes) -> bytes:
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: http://" + host + b"\r\n\r\n"
    )


@pytest.mark.parametrize(
    "overrides, target, host, expected_target, expected_host",
    [
        ({"preserve_host": True}, b"/terminals/websocket/1", b"nb-{port}.localhost:4711",
         b"/terminals/websocket/1", b"nb-{port}.localhost:4711"),
        ({"preserve_host": True}, b"/api/ws", b"nb-{port}.localhost",
         b"/api/ws", b"nb-{port}.localhost"),
        ({}, b"/api/ws", b"nb-{port}.localhost:4711", b"/api/ws", b"127.0.0.1:{port}"),
        ({"mode": "uri", "uri_keep_prefix": True}, b"/nb/{port}/api/ws?t=1", b"x",
         b"/nb/{port}/api/ws?t=1", b"127.0.0.1:{port}"),
        ({"mode": "uri", "uri_keep_prefix": True, "preserve_host": True},
         b"/nb/{port}/api/ws", b"apps.example.com", b"/nb/{port}/api/ws", b"apps.example.com"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_websocket_backend_handshake(
    tmp_path: Path,
    overrides: dict[str, Any],
    target: bytes,
    host: bytes,
    expected_target: bytes,
    expected_host: bytes,
) -> None:
    """The relay's backend handshake carries the same Host and path the HTTP engines send."""
    backend = RawBackend(answer=b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", close_after=True)
    service = await start(tmp_path, **overrides)
    try:
        port = backend.port.getHost().port

        def fill(value: bytes) -> bytes:
            return value.replace(b"{port}", b"%d" % port)

        client = await exchange(service, upgrade(fill(target), fill(host)))
        # The backend's refusal reaches the client: the handshake was sent.
        assert client.received.startswith(b"HTTP/1.1 403"), bytes(client.received)
        head = backend_head(backend)
        assert head.split(b"\r\n")[0] == b"GET " + fill(expected_target) + b" HTTP/1.1"
        assert header_values(head, b"host") == [fill(expected_host)]
        assert re.search(rb"(?i)\r\nupgrade: websocket\r\n", head)
    finally:
        await service.stopService()
        await backend.port.stopListening()


# -- configuration ---------------------------------------------------------------------


def test_flags_parse_into_the_config() -> None:
    """--preserve-host and --uri-keep-prefix are plain switches, off by default."""
    options = IngressOptions()
    options.parseOptions(["--provider-type", "file", "--sandboxes-file", "x"])
    config = config_from_options(options)
    assert (config.preserve_host, config.uri_keep_prefix) == (False, False)
    options = IngressOptions()
    options.parseOptions(
        ["--provider-type", "file", "--sandboxes-file", "x", "--mode", "uri",
         "--preserve-host", "--uri-keep-prefix"]
    )
    config = config_from_options(options)
    assert (config.preserve_host, config.uri_keep_prefix) == (True, True)


def test_uri_keep_prefix_needs_uri_mode() -> None:
    """--uri-keep-prefix in header mode is a start-up error naming the flag."""
    with pytest.raises(ConfigError, match="^--uri-keep-prefix: only applies with --mode uri$"):
        IngressConfig(provider_type="file", sandboxes_file="x", uri_keep_prefix=True).validate()
