"""
The twisted.web engine's upstream client (opensandbox_ingress.web.upstream)
in memory: every response byte passes the framing layer before Twisted's
parser, so a response the policy refuses fails the request instead of
reaching the client.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import Request, ResponseFailed
from twisted.web.http_headers import Headers

from opensandbox_ingress.web.upstream import InvalidUpstreamResponse, _IngressClientProtocol


def _send(protocol: _IngressClientProtocol, method: bytes = b"GET") -> list[object]:
    results: list[object] = []
    request = Request(method, b"/", Headers({b"host": [b"x"]}), None, persistent=True)
    protocol.request(request).addBoth(results.append)
    return results


def _connected() -> tuple[_IngressClientProtocol, StringTransport]:
    protocol = _IngressClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
def test_refused_response_fails_the_request(answer: bytes) -> None:
    """A head the framing policy refuses aborts the connection and fails with InvalidUpstreamResponse."""
    protocol, transport = _connected()
    results = _send(protocol)
    protocol.dataReceived(answer)
    assert transport.disconnecting or transport.disconnected
    protocol.connectionLost(Failure(ConnectionAbortedError()))
    [result] = results
    assert isinstance(result, Failure)
    assert result.check(ResponseFailed)
    assert any(r.check(InvalidUpstreamResponse) for r in result.value.reasons)


def test_valid_response_reaches_twisted() -> None:
    """A valid response is Twisted's as before, its Connection header recorded."""
    protocol, transport = _connected()
    results = _send(protocol)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nContent-Length: 2\r\n\r\nok")
    [response] = results
    assert response.code == 200
    assert response.connection_header == [b"x-a"]
    assert not transport.disconnecting
