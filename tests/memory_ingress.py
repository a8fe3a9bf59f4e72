"""
An ingress driven entirely in memory: a C{MemoryReactorClock} for every
timer and dial, C{StringTransport}s for the client and the backends.  No
socket is opened and no time passes but what a test advances.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from opensandbox_ingress import IngressConfig, IngressService, SandboxRecord
from tests.helpers import write_sandboxes

CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 40000)
BACKEND_HOST = "10.0.0.5"


class Backend:
    """One dialled backend connection: its protocol and transport."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def received(self) -> bytes:
        """Everything the ingress wrote to this backend so far."""
        return self.transport.value()

    def answer(self, data: bytes) -> None:
        """Bytes from the backend."""
        self.protocol.dataReceived(data)


class Client:
    """One client connection to the proxy listener's protocol."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        """Everything the ingress wrote to this client so far."""
        return self.transport.value()

    def statuses(self) -> list[int]:
        """The status codes of the responses received, in order."""
        return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.received())]


class MemoryIngress:
    """
    An unstarted L{IngressService} on a fake reactor, with sandbox C{sbx}
    at L{BACKEND_HOST} (ready unless told otherwise).
    """

    def __init__(self, tmp_path: Path, ready: bool = True, **config: Any) -> None:
        path = tmp_path / "sandboxes.json"
        write_sandboxes(path, [])
        self.clock = MemoryReactorClock()
        self.service = IngressService(
            IngressConfig(provider_type="file", sandboxes_file=str(path), **config), self.clock
        )
        self.set_sandbox(ready=ready)
        self._dialled = 0

    def set_sandbox(self, ready: bool = True, generation: str = "g1") -> None:
        """Install the one sandbox's record (ready or not)."""
        self.service.registry.replace_all(
            [
                SandboxRecord(
                    "sbx",
                    endpoint=BACKEND_HOST if ready else None,
                    ready=ready,
                    not_ready_reason="" if ready else "pod pending",
                    generation=generation,
                )
            ]
        )

    def connect(self, listener: Any = None) -> Client:
        """A client connection to the proxy listener (or to C{listener})."""
        factory = listener if listener is not None else self.service.factory
        protocol = factory.buildProtocol(CLIENT_ADDRESS)
        transport = StringTransport(peerAddress=CLIENT_ADDRESS)
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def dials(self) -> list[tuple[Any, ...]]:
        """Every backend dial so far: (host, port, factory, timeout, bind)."""
        return list(self.clock.tcpClients)

    def accept_dial(self, index: int | None = None) -> Backend:
        """Complete the next (or the C{index}th) backend dial."""
        if index is None:
            index = self._dialled
        self._dialled = index + 1
        host, port, factory, _timeout, _bind = self.clock.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 50000 + index),
            peerAddress=IPv4Address("TCP", host, port),
        )
        protocol.makeConnection(transport)
        return Backend(protocol, transport)


def get(path: str = "/x", extra: str = "", method: str = "GET") -> bytes:
    """A request for sandbox C{sbx} port 8080 (header mode)."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: ingress.example\r\n"
        f"OpenSandbox-Ingress-To: sbx-8080\r\n{extra}\r\n"
    ).encode()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
