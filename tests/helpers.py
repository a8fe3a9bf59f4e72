"""Shared test helpers: waiting with a deadline, ingress start-up, clients."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from opensandbox_ingress import IngressConfig, IngressService, build_ingress


def _tick(delay: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(delay, d.callback, None)
    return d


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition"
) -> Any:
    """Poll C{predicate} on the reactor until it is truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await _tick(0.005)


def write_sandboxes(path: Path, sandboxes: list[dict[str, Any]]) -> None:
    """Write a sandboxes file atomically (rename), as an operator's tool would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sandboxes))
    tmp.replace(path)


async def start_ingress(
    tmp_path: Path, sandboxes: list[dict[str, Any]], **overrides: Any
) -> IngressService:
    """Start an ingress on the file provider, on a free loopback port, synced."""
    path = tmp_path / "sandboxes.json"
    write_sandboxes(path, sandboxes)
    overrides.setdefault("listen", ("tcp:0:interface=127.0.0.1",))
    config = IngressConfig(provider_type="file", sandboxes_file=str(path), **overrides)
    service = build_ingress(config, reactor)
    service.startService()
    await service.when_listening()
    await service.registry.when_synced()
    return service


#: The two front-ends an HTTP behaviour test can run through: the proxy
#: listener (the default), and the Resource tree mounted in a plain
#: twisted.web Site, as an embedding program does (README "Embedding").
FRONT_ENDS = ("listener", "site")

#: The embedder's listening port of each ingress started with front_end="site".
_embedded: dict[int, Any] = {}


async def start_front_end(
    tmp_path: Path, sandboxes: list[dict[str, Any]], front_end: str, **overrides: Any
) -> IngressService:
    """
    L{start_ingress}, reached through C{front_end}: with C{"site"}, the
    service's C{resource} is also served by a plain C{Site} on a loopback
    port, and L{ingress_port} / L{ingress_url} name that port.  Stop it
    with L{stop_front_end}.
    """
    service = await start_ingress(tmp_path, sandboxes, **overrides)
    if front_end == "site":
        _embedded[id(service)] = reactor.listenTCP(0, Site(service.resource), interface="127.0.0.1")
    return service


async def stop_front_end(service: IngressService) -> None:
    """Stop an ingress from L{start_front_end} and its embedder's port."""
    port = _embedded.pop(id(service), None)
    if port is not None:
        await port.stopListening()
    await service.stopService()


def ingress_port(service: IngressService) -> int:
    """The port of the front-end under test (the proxy listener unless embedded)."""
    port = _embedded.get(id(service))
    if port is not None:
        return int(port.getHost().port)
    return int(service.addresses()[0].port)


def ingress_url(service: IngressService, path: str = "/") -> str:
    return f"http://127.0.0.1:{ingress_port(service)}{path}"


async def request(
    method: str,
    url: str,
    headers: dict[str, Any] | None = None,
    data: bytes | None = None,
) -> tuple[Any, bytes]:
    """One request over a fresh connection; returns (response, body)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.request(
        method, url, headers=headers, data=data, pool=pool, allow_redirects=False
    )
    body = await treq.content(response)
    return response, body


def header(response: Any, name: str) -> str | None:
    """The first value of a response header, as text, or None."""
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


class RawClient(Protocol):
    """A raw HTTP/1.1 client connection: the test writes bytes and reads what arrives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.closed.callback(None)


async def raw_connect(port: int) -> RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client
