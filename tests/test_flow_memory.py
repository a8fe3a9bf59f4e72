"""
Pipelining, backpressure both ways, the retry of an idempotent request on
a dead pooled connection and dialling, on the proxy listener, in memory
(C{StringTransport}s and a C{MemoryReactorClock}; no sockets, no sleeps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import error as ierror
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from opensandbox_ingress import SandboxRecord
from opensandbox_ingress.web.pool import client_endpoint
from opensandbox_ingress.web.server import PIPELINE_LIMIT
from tests.memory_ingress import OK, Backend, Client, MemoryIngress, get

# -- pipelining -----------------------------------------------------------------------------


def test_pipelined_requests_are_forwarded_one_at_a_time_and_answered_in_order(
    tmp_path: Path,
) -> None:
    """The second request waits for the first response, then reuses the backend connection."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(get("/first") + get("/second"))
    backend = ingress.accept_dial()
    assert backend.received().count(b" HTTP/1.1\r\n") == 1
    assert b"GET /first " in backend.received()
    backend.transport.clear()
    backend.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    assert b"GET /second " in backend.received()
    assert len(ingress.dials()) == 1
    backend.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nsecond")
    assert client.statuses() == [200, 201]
    assert client.received().index(b"first") < client.received().index(b"second")


def test_pipelined_bytes_beyond_the_limit_pause_the_client(tmp_path: Path) -> None:
    """More than PIPELINE_LIMIT bytes behind a response in flight pause reading; the response resumes it."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(get("/first"))
    backend = ingress.accept_dial()
    filler = get("/next", extra=f"X-Pad: {'p' * 1000}\r\n")
    while client.protocol.pipelined_bytes <= PIPELINE_LIMIT:
        assert client.transport.producerState == "producing"
        client.send(filler)
    assert client.transport.producerState == "paused"
    backend.answer(OK)
    assert client.transport.producerState == "producing"


# -- backpressure ---------------------------------------------------------------------------


def test_slow_client_pauses_the_backend_read(tmp_path: Path) -> None:
    """A client whose send buffer is full pauses reading the response from the backend."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(get())
    backend = ingress.accept_dial()
    backend.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    producer = client.transport.producer
    assert producer is not None and client.transport.streaming
    producer.pauseProducing()
    assert backend.transport.producerState == "paused"
    producer.resumeProducing()
    assert backend.transport.producerState == "producing"
    backend.answer(b"world")
    assert client.received().endswith(b"helloworld")
    # The exchange is over: the client transport no longer drives the backend.
    assert client.transport.producer is None


def test_slow_backend_pauses_the_client_upload(tmp_path: Path) -> None:
    """A backend whose send buffer is full pauses reading the upload from the client."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(get(method="POST", extra="Content-Length: 10\r\n") + b"12345")
    # No backend connection yet: the upload waits, and so does the client.
    assert client.transport.producerState == "paused"
    backend = ingress.accept_dial()
    assert client.transport.producerState == "producing"
    assert backend.received().endswith(b"\r\n\r\n12345")
    producer = backend.transport.producer
    assert producer is not None
    producer.pauseProducing()
    assert client.transport.producerState == "paused"
    producer.resumeProducing()
    assert client.transport.producerState == "producing"
    client.send(b"67890")
    assert backend.received().endswith(b"1234567890")
    # The upload is complete: the backend transport no longer drives the client.
    assert backend.transport.producer is None
    backend.answer(OK)
    assert client.statuses() == [200]


# -- retry on a dead pooled connection -------------------------------------------------------


def _pooled(ingress: MemoryIngress) -> tuple[Client, Backend]:
    """A client whose first request left its backend connection in the pool."""
    client = ingress.connect()
    client.send(get("/warm"))
    backend = ingress.accept_dial()
    backend.answer(OK)
    assert client.statuses() == [200]
    backend.transport.clear()
    return client, backend


def test_idempotent_request_on_a_dead_pooled_connection_is_retried_once(tmp_path: Path) -> None:
    """A GET whose pooled connection closes before answering goes again on a fresh one."""
    ingress = MemoryIngress(tmp_path)
    client, backend = _pooled(ingress)
    client.send(get("/again"))
    assert b"GET /again " in backend.received()
    assert len(ingress.dials()) == 1
    # As a backend whose keep-alive timeout fired just then.
    backend.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert len(ingress.dials()) == 2
    fresh = ingress.accept_dial()
    assert b"GET /again " in fresh.received()
    fresh.answer(OK)
    assert client.statuses() == [200, 200]


def test_non_idempotent_request_on_a_dead_pooled_connection_is_not_retried(tmp_path: Path) -> None:
    """A POST whose pooled connection closes before answering gets 502, never a second send."""
    ingress = MemoryIngress(tmp_path)
    client, backend = _pooled(ingress)
    client.send(get("/submit", method="POST", extra="Content-Length: 2\r\n") + b"hi")
    backend.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert len(ingress.dials()) == 1
    assert client.statuses() == [200, 502]


def test_retry_happens_once(tmp_path: Path) -> None:
    """A fresh connection that also dies before answering is a 502, not a third try."""
    ingress = MemoryIngress(tmp_path)
    client, backend = _pooled(ingress)
    client.send(get("/again"))
    backend.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    fresh = ingress.accept_dial()
    fresh.protocol.connectionLost(Failure(ierror.ConnectionLost()))
    assert len(ingress.dials()) == 2
    assert client.statuses() == [200, 502]


# -- dialling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("10.0.0.5", TCP4ClientEndpoint),
        ("fd00::5", TCP6ClientEndpoint),
        ("pod.ns.svc.cluster.local", HostnameEndpoint),
    ],
)
def test_one_endpoint_builder_picks_the_endpoint_by_address_kind(host: str, kind: type) -> None:
    """Address literals dial directly, names resolve first; all with the connect timeout."""
    clock = MemoryReactorClock()
    endpoint = client_endpoint(clock, host, 8080, 2.5)
    assert type(endpoint) is kind
    endpoint.connect(Factory.forProtocol(Protocol))
    if kind is not HostnameEndpoint:
        assert clock.tcpClients[0][:2] == (host, 8080)
        assert clock.tcpClients[0][3] == 2.5


def test_ipv6_backend_is_dialled_and_served(tmp_path: Path) -> None:
    """A sandbox at an IPv6 address is dialled through the endpoint and proxied, Host bracketed."""
    ingress = MemoryIngress(tmp_path)
    ingress.service.registry.replace_all([SandboxRecord("sbx", endpoint="fd00::5", generation="g")])
    client = ingress.connect()
    client.send(get())
    [(host, port, _factory, timeout, _bind)] = ingress.dials()
    assert (host, port, timeout) == ("fd00::5", 8080, 10.0)
    backend = ingress.accept_dial()
    assert b"\r\nHost: [fd00::5]:8080\r\n" in backend.received()
    backend.answer(OK)
    assert client.statuses() == [200]
