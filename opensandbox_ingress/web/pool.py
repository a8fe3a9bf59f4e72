"""
The one backend client: connections pooled per sandbox generation, used
by both HTTP front-ends (the proxy listener's exchanges and the
C{twisted.web} resource's), and the one endpoint builder (also the
WebSocket relay's dial).

L{BackendConnection} writes requests and frames responses with the framing
layer, feeding the events to the exchange attached to it (any object with
the L{ConnectionUser} methods); L{BackendPool} keeps idle connections by
(sandbox generation, host, port) and dials new ones.

Twisted's own C{HTTPConnectionPool} keys connections by (scheme, host,
port); pod addresses are recycled, so that key would hand one sandbox's
idle socket to the next sandbox given the same address.  Here a connection
is only reused for the same incarnation of the same sandbox;
L{BackendPool.drop_generation} closes a changed or vanished sandbox's idle
connections, and a retired generation is never pooled again.

Ownership: reactor thread only.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error as ierror
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .._compat import PYPY
from ..framing import Data, EndOfMessage, Event, FramingError, ResponseHead, response_parser

#: Socket read size.  256 KiB makes a 1 MiB body four reactor trips instead
#: of sixteen on CPython; on PyPy strings that large live outside the
#: nursery until a major collection, and a busy ingress grew past 1 GiB, so
#: it keeps Twisted's 64 KiB.
READ_SIZE = 1 << 16 if PYPY else 1 << 18

#: Seconds an idle pooled connection is kept, and the most kept per key.
POOLED_IDLE_S = 60.0
MAX_IDLE_PER_KEY = 32

#: How many recently dropped generations are remembered, so that a request
#: still in flight when its sandbox changed does not return its connection
#: to the pool.
RETIRED_GENERATIONS = 4096

PoolKey = tuple[str, str, int]

_CONNECTION_DONE = Failure(ierror.ConnectionDone())


def client_endpoint(
    reactor: Any, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    The one endpoint builder for backends (the HTTP clients and the
    WebSocket relay's dial): C{TCP4ClientEndpoint} / C{TCP6ClientEndpoint}
    for an address literal, C{HostnameEndpoint} for a name, each bounded by
    C{timeout} seconds.
    """
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
    return cls(reactor, host, port, timeout=timeout)


class ConnectionUser(TypingProtocol):
    """What a connection needs of the exchange it serves."""

    head: Any

    def attached(self, upstream: BackendConnection, reused: bool) -> None: ...
    def connecting(self, connector: Any) -> None: ...
    def connect_failed(self, failure: Failure) -> None: ...
    def response_head(self, response: ResponseHead) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def response_end(self, reusable: bool) -> None: ...
    def flush(self) -> None: ...
    def upstream_lost(self, failure: Failure, responded: bool) -> None: ...
    def upstream_invalid(self, why: str, responded: bool) -> None: ...


class BackendConnection(Protocol):
    """
    One connection to a backend: writes requests, frames responses with
    the framing layer and feeds them to its current L{ConnectionUser}.  Pooled
    between exchanges; any byte it was not asked for (after a response, or
    while idle in the pool) closes it.
    """

    def __init__(
        self, pool: BackendPool, key: PoolKey, dial: _ConnectionFactory | None = None
    ) -> None:
        self.pool = pool
        self.key = key
        self._dial = dial
        self.exchange: ConnectionUser | None = None
        self.idle_since = 0.0
        self._parser = response_parser()
        self._reusable = True
        self._responded = False
        self._connected = False

    def connectionMade(self) -> None:
        self._connected = True
        # A request head and a small body are separate writes; Nagle plus a
        # delayed ACK would hold the second for tens of milliseconds.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            # Fewer, larger reads for big responses (also the write-buffer
            # size past which a slow backend pauses the client's upload).
            self.transport.bufferSize = READ_SIZE  # type: ignore[union-attr,attr-defined]
        dial, self._dial = self._dial, None
        exchange = dial.exchange if dial is not None else None
        if dial is not None:
            dial.exchange = None
        if exchange is not None:
            self.attach(exchange, False)
        elif self.transport is not None:
            # Its exchange was cancelled while dialling.
            self._connected = False
            self.transport.loseConnection()

    def attach(self, exchange: ConnectionUser, reused: bool) -> None:
        """Serve C{exchange} next."""
        self.exchange = exchange
        self._parser.expect(exchange.head.method)
        self._reusable = True
        self._responded = False
        exchange.attached(self, reused)

    def release(self, reusable: bool) -> None:
        """The exchange is over with this connection."""
        self.exchange = None
        if reusable and self._reusable and self.transport is not None and self._connected:
            self.pool.put(self)
        elif self.transport is not None:
            self._connected = False
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._connected = False
        self.pool.discard(self)
        exchange = self.exchange
        if exchange is None:
            return
        if self._responded and reason.check(ierror.ConnectionDone):
            # A clean close ends a read-until-close body; any other body
            # it cuts short is a lost connection, below.
            for event in self._parser.feed_eof():
                if type(event) is EndOfMessage:
                    self._reusable = False
                    self._end()
                    return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(reason, self._responded)

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: this connection cannot be trusted.
            self._reusable = False
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._events(self._parser.feed(data))

    def _events(self, events: list[Event]) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        for event in events:
            if type(event) is Data:
                exchange.response_data(event.data)
            elif type(event) is ResponseHead:
                if not event.keep_alive:
                    self._reusable = False
                self._responded = True
                exchange.response_head(event)
            elif type(event) is EndOfMessage:
                if not event.clean:
                    self._reusable = False
                self._end()
                return
            elif type(event) is FramingError:
                self._fail(event.reason)
                return
            if self.exchange is not exchange:
                return
        # The head is held until body bytes come; send it with this read.
        exchange.flush()

    def _fail(self, why: str) -> None:
        """The backend sent bytes the ingress does not relay: drop it."""
        self._reusable = False
        exchange, self.exchange = self.exchange, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if exchange is not None:
            exchange.upstream_invalid(why, self._responded)

    def _end(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_end(self._reusable)


class _ConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: BackendPool, key: PoolKey, exchange: ConnectionUser) -> None:
        self.pool = pool
        self.key = key
        self.exchange: ConnectionUser | None = exchange

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return BackendConnection(self.pool, self.key, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connect_failed(reason)


class _TCPDial:
    """A pending C{connectTCP} with the interface the exchange cancels by."""

    __slots__ = ("connector", "factory")

    def __init__(self, connector: Any, factory: _ConnectionFactory) -> None:
        self.connector = connector
        self.factory = factory

    def cancel(self) -> None:
        self.factory.exchange = None
        try:
            self.connector.stopConnecting()
        except ierror.NotConnectingError:
            # Connected, not attached yet: the connection closes itself.
            pass


class _EndpointDial:
    """A pending endpoint connect (host names, IPv6)."""

    __slots__ = ("deferred", "factory")

    def __init__(self, deferred: Any, factory: _ConnectionFactory) -> None:
        self.deferred = deferred
        self.factory = factory

    def cancel(self) -> None:
        self.factory.exchange = None
        self.deferred.cancel()


class BackendPool:
    """
    Idle backend connections by (sandbox generation, host, port).

    Pod addresses are recycled, so a connection is only reused for the
    same incarnation of the same sandbox; L{drop_generation} closes a
    changed or vanished sandbox's idle connections and keeps its busy ones
    out of the pool.
    """

    def __init__(self, reactor: Any, connect_timeout_s: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout_s
        #: Generations never pooled again (L{drop_generation}), oldest first.
        self._retired: OrderedDict[str, None] = OrderedDict()
        self._idle: dict[PoolKey, list[BackendConnection]] = {}
        self._keys_by_generation: dict[str, set[PoolKey]] = {}
        self._families: dict[str, int] = {}
        self._sweeper: LoopingCall | None = None
        self._clock: IReactorTime = reactor

    def acquire(self, key: PoolKey, exchange: ConnectionUser) -> None:
        """Attach an idle connection of C{key} to C{exchange}, or dial one."""
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn._connected:
                conn.attach(exchange, True)
                return
        self.connect(key, exchange)

    def connect(self, key: PoolKey, exchange: ConnectionUser) -> None:
        """Dial a new connection for C{exchange}."""
        _generation, host, port = key
        family = self._families.get(host)
        if family is None:
            try:
                family = ipaddress.ip_address(host).version
            except ValueError:
                family = 0
            if len(self._families) < 65536:
                self._families[host] = family
        factory = _ConnectionFactory(self, key, exchange)
        if family == 4:
            # connectTCP directly: an endpoint's Deferred chain costs more
            # than the dial itself on the hot path.
            connector = self._reactor.connectTCP(host, port, factory, timeout=self._timeout)
            exchange.connecting(_TCPDial(connector, factory))
            return
        d = client_endpoint(self._reactor, host, port, self._timeout).connect(factory)
        exchange.connecting(_EndpointDial(d, factory))

        def failed(failure: Failure) -> None:
            live = factory.exchange
            factory.exchange = None
            if live is not None:
                live.connect_failed(failure)

        # Success needs nothing here: the protocol attaches itself.
        d.addErrback(failed)

    def put(self, conn: BackendConnection) -> None:
        """Keep C{conn} for the next exchange of its key."""
        key = conn.key
        generation = key[0]
        conns = self._idle.setdefault(key, [])
        if generation in self._retired or len(conns) >= MAX_IDLE_PER_KEY:
            conn._connected = False
            if conn.transport is not None:
                conn.transport.loseConnection()
            return
        conn.idle_since = self._clock.seconds()
        conns.append(conn)
        self._keys_by_generation.setdefault(generation, set()).add(key)
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._reactor
            self._sweeper.start(POOLED_IDLE_S / 4, now=False)

    def discard(self, conn: BackendConnection) -> None:
        """C{conn} closed: forget it if it was idle."""
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def _sweep(self) -> None:
        cutoff = self._clock.seconds() - POOLED_IDLE_S
        for key, conns in list(self._idle.items()):
            keep = []
            for conn in conns:
                if conn.idle_since < cutoff:
                    conn._connected = False
                    if conn.transport is not None:
                        conn.transport.loseConnection()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
                keys = self._keys_by_generation.get(key[0])
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._keys_by_generation[key[0]]
        if not self._idle and self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def drop_generation(self, generation: str) -> None:
        """
        Close the idle connections of C{generation} and never pool its
        connections again (those still busy close when their exchange ends).
        """
        retired = self._retired
        retired[generation] = None
        if len(retired) > RETIRED_GENERATIONS:
            retired.popitem(last=False)
        for key in self._keys_by_generation.pop(generation, ()):
            for conn in self._idle.pop(key, []):
                conn._connected = False
                if conn.transport is not None:
                    conn.transport.loseConnection()

    def idle_connection_count(self) -> int:
        """How many idle connections the pool holds."""
        return sum(len(c) for c in self._idle.values())

    def close(self) -> None:
        """Close every idle connection (the service is stopping)."""
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        self._keys_by_generation.clear()
        for conns in idle.values():
            for conn in conns:
                conn._connected = False
                if conn.transport is not None:
                    conn.transport.loseConnection()
