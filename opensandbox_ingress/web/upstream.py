"""
Upstream HTTP connections, pooled per sandbox generation.

Twisted's C{HTTPConnectionPool} keys connections by (scheme, host, port).
Pod IPs are recycled, so that key would hand one sandbox's idle socket to
the next sandbox that gets the same address.  Here the key is (sandbox
generation, host, port): a connection is only ever reused for the same
incarnation of the same sandbox, and when a record changes or goes its idle
connections are closed (L{SandboxConnectionPool.drop_generation}).

The endpoint and URI objects are built once per key and cached, because
building an endpoint per request (IDNA-encoding the address each time) is a
measurable share of the hot path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from ..framing import EndOfMessage, FramingError, ResponseParser, response_parser
from .forwarding import InvalidUpstreamResponse
from .pool import BackendPool, client_endpoint

#: How many recently dropped generations are remembered, so that a request
#: still in flight when its sandbox changed does not return its connection
#: to the pool.
_DEAD_GENERATIONS = 4096

#: Idle pooled connections kept per (generation, host, port).
MAX_IDLE_PER_SANDBOX_PORT = 32

#: Seconds an idle pooled connection is kept before it is closed.
POOLED_IDLE_S = 60.0

PoolKey = tuple[str, str, int]

_CONNECTION_DONE = Failure(ConnectionDone())


class _IngressClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's client, with the ingress's framing layer in front: every
    response byte is framed by L{opensandbox_ingress.framing} first (the
    same parser and policy as the fast path), and a response it refuses
    never reaches Twisted's parser; the request fails with
    L{InvalidUpstreamResponse}.  (Twisted's parser reads a bare LF as a
    line end and takes any integer status.)

    Also records the response's C{Connection} header on the response
    (C{connection_header}): Twisted's client files it among the connection
    control headers, out of C{response.headers}, but a proxy must also drop
    the headers that C{Connection} lists (RFC 9110 section 7.6.1).
    """

    _framing: ResponseParser | None = None
    _invalid: str | None = None

    def dataReceived(self, data: bytes) -> None:
        framing = self._framing
        taint = False
        if framing is not None:
            for event in framing.feed(data):
                if type(event) is FramingError:
                    self._invalid = event.reason
                    self._framing = None
                    assert self.transport is not None
                    self.transport.abortConnection()  # type: ignore[attr-defined]
                    return
                if type(event) is EndOfMessage:
                    self._framing = None
                    taint = not event.clean
        super().dataReceived(data)
        if taint and self.transport is not None:
            # Bytes followed the response: never reuse this connection.
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if self._invalid is not None:
            reason = Failure(InvalidUpstreamResponse(self._invalid))
        super().connectionLost(reason)

    def connectionMade(self) -> None:
        super().connectionMade()
        # A request head and a small body are separate writes; Nagle plus a
        # delayed ACK would hold the second for tens of milliseconds.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def request(self, request: Any) -> Deferred[IResponse]:
        framing = response_parser()
        framing.expect(request.method)
        self._framing = framing
        d = super().request(request)
        parser = self._parser

        def note(response: Any) -> Any:
            if parser is not None:
                response.connection_header = parser.connHeaders.getRawHeaders(
                    b"connection"
                )
            return response

        return d.addCallback(note)


class _QuietClientFactory(_HTTP11ClientFactory):
    # One "Starting factory" log line per upstream connection is noise.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _IngressClientProtocol(self._quiescentCallback)


class SandboxConnectionPool(HTTPConnectionPool):
    """
    A persistent pool whose keys start with a sandbox generation.

    Ownership: reactor thread.  Invariant: no connection is ever put back
    under a generation that L{drop_generation} retired.
    """

    _factory = _QuietClientFactory
    maxPersistentPerHost = MAX_IDLE_PER_SANDBOX_PORT
    cachedConnectionTimeout = POOLED_IDLE_S  # type: ignore[assignment]

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)
        self._keys_by_generation: dict[str, set[PoolKey]] = {}
        #: Generations never pooled again (L{drop_generation}); shared with
        #: the fast path's L{BackendPool}.
        self.retired: OrderedDict[str, None] = OrderedDict()

    def _putConnection(self, key: PoolKey, connection: Any) -> None:
        generation = key[0]
        if generation in self.retired:
            connection.transport.loseConnection()
            return
        self._keys_by_generation.setdefault(generation, set()).add(key)
        super()._putConnection(key, connection)

    def drop_generation(self, generation: str) -> None:
        """
        Close the idle connections of C{generation} and never pool its
        connections again.
        """
        self.retired[generation] = None
        if len(self.retired) > _DEAD_GENERATIONS:
            self.retired.popitem(last=False)
        for key in self._keys_by_generation.pop(generation, ()):
            for connection in self._connections.pop(key, []):
                timeout = self._timeouts.pop(connection, None)
                if timeout is not None and timeout.active():
                    timeout.cancel()
                connection.transport.loseConnection()

    def idle_connection_count(self) -> int:
        """How many idle connections the pool holds (for tests and metrics)."""
        return sum(len(c) for c in self._connections.values())


class UpstreamClient:
    """
    Issues upstream requests for a (generation, host, port) key with a
    cached endpoint, through a L{SandboxConnectionPool}.
    """

    def __init__(self, reactor: Any, connect_timeout_s: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout_s
        self.pool = SandboxConnectionPool(reactor)
        # The fast path's pool (imported here: fast imports proxy, which
        # this module must not depend on at import time).

        #: The fast path's connections; retired generations are shared.
        self.fast = BackendPool(reactor, connect_timeout_s, self.pool.retired)
        self._agent = Agent(reactor, pool=self.pool)
        self._targets: dict[PoolKey, tuple[IStreamClientEndpoint, URI]] = {}
        self._target_keys: dict[str, list[PoolKey]] = {}

    def _target(self, key: PoolKey) -> tuple[IStreamClientEndpoint, URI]:
        target = self._targets.get(key)
        if target is None:
            _generation, host, port = key
            endpoint = client_endpoint(self._reactor, host, port, self._connect_timeout)
            if ":" in host:
                netloc = b"[" + host.encode("ascii") + b"]"
            else:
                netloc = host.encode("idna")
            uri = URI(
                scheme=b"http",
                netloc=b"%s:%d" % (netloc, port),
                host=netloc,
                port=port,
                path=b"/",
                params=b"",
                query=b"",
                fragment=b"",
            )
            target = self._targets[key] = (endpoint, uri)
            self._target_keys.setdefault(key[0], []).append(key)
        return target

    def forget_generation(self, generation: str) -> None:
        """Drop pooled connections and cached endpoints of C{generation}."""
        self.pool.drop_generation(generation)
        self.fast.drop_generation(generation)
        for key in self._target_keys.pop(generation, ()):
            self._targets.pop(key, None)

    def request(
        self,
        key: PoolKey,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """Send one request to the key's backend; C{headers} carry C{Host}."""
        endpoint, uri = self._target(key)
        # Agent._requestWithEndpoint is the one entry point of Agent that
        # takes our own pool key and endpoint; see
        # https://github.com/twisted/twisted/blob/trunk/src/twisted/web/client.py
        return self._agent._requestWithEndpoint(
            # The key's type is documented as (scheme, host, port) but the
            # pool only hashes it.
            key,  # type: ignore[arg-type]
            endpoint,
            method,
            uri,
            headers,
            body,
            path,
        )

    def idle_connection_count(self) -> int:
        """Idle pooled connections of both paths (for tests and metrics)."""
        return self.pool.idle_connection_count() + self.fast.idle_connection_count()

    def close(self) -> Deferred[None]:
        """Close every pooled connection."""
        self.fast.close()
        return self.pool.closeCachedConnections()
