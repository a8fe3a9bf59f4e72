#!/usr/bin/env python3
"""
The two ends of C{bench/ws_bench.py}, each run as its own process
(Twisted + Autobahn, the same stack as the ingress):

    python3 bench/ws_peer.py backend
        Prints its port, then serves until SIGTERM.  Path /echo echoes
        every message; /sink reads messages frame by frame (nothing is
        assembled) and answers each with its size as a text message; any
        other path just stays open (idle sessions).

    python3 bench/ws_peer.py throughput URL --size N [--connections C]
            [--window W] [--warmup S] [--duration S] [--header 'Name: value']
        C connections to an echo URL, each keeping W binary messages of N
        bytes in flight (a new one is sent per echo received), so the figure
        is throughput, not latency.  Prints one JSON line: messages echoed
        and payload bytes in the measured window, and its seconds.

    python3 bench/ws_peer.py idle URL --count N [--concurrency K] [--deflate]
            [--header ...]
        Opens N sessions, at most K handshakes at a time, stopping at the
        first failure.  With --deflate each offers permessage-deflate as a
        browser does and, once open, sends one 1 KiB text message to an
        echo URL and waits for it (so compression has been used).  Prints
        one JSON line (opened, compressed, failed, error), holds the
        sessions until a line (or EOF) arrives on stdin, then drops them.

    python3 bench/ws_peer.py big URL --size N [--header ...]
        Sends one binary message of N bytes to a sink URL as a single frame,
        streamed in 1 MiB chunks under backpressure (the sender never holds
        the message), waits for the size to come back, prints JSON.

Every process raises its RLIMIT_NOFILE soft limit to the hard limit.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

reactor: Any = _reactor

#: Protocol options of every peer: no size caps, no pings, no compression,
#: slow handshakes tolerated (10,000 sessions are opened through one port).
OPTIONS: dict[str, Any] = {
    "maxFramePayloadSize": 0,
    "maxMessagePayloadSize": 0,
    "autoFragmentSize": 0,
    "autoPingInterval": 0,
    "openHandshakeTimeout": 60,
    "closeHandshakeTimeout": 5,
    "failByDrop": True,
    "utf8validateIncoming": False,
}

CHUNK = 1024 * 1024


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new limits."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard, hard


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _FastSend:
    """
    Autobahn's C{sendData} formats a debug log call on every write; the
    ingress skips it (see C{opensandbox_ingress/web/websocket.py}), and so do
    the peers, so that the direct baseline is the best this stack does.

    Autobahn's C{connectionMade} means to set TCP_NODELAY but reads the
    option before copying it from the factory, and its bare C{except} hides
    the C{AttributeError}: Nagle stays on.  The peers set it themselves, as
    browsers and most WebSocket clients do.
    """

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[misc]
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)  # type: ignore[attr-defined]


# -- backend -------------------------------------------------------------------


class BackendProtocol(_FastSend, WebSocketServerProtocol):  # type: ignore[misc]
    mode = "idle"
    sunk = 0

    def onConnect(self, request: Any) -> None:
        path = request.path.rstrip("/")
        self.mode = {"/echo": "echo", "/sink": "sink"}.get(path, "idle")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.mode == "echo":
            self.sendMessage(payload, isBinary)

    # Frame-level hooks: /sink counts bytes and never assembles a message.

    def onMessageBegin(self, isBinary: bool) -> None:
        if self.mode == "sink":
            self.sunk = 0
        else:
            super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        if self.mode != "sink":
            super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.mode == "sink":
            self.sunk += len(payload)
        else:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if self.mode != "sink":
            super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if self.mode == "sink":
            self.sendMessage(str(self.sunk).encode(), isBinary=False)
        else:
            super().onMessageEnd()


def run_backend(_args: argparse.Namespace) -> None:
    raise_nofile()
    factory = WebSocketServerFactory()
    factory.protocol = BackendProtocol
    factory.noisy = False
    factory.setProtocolOptions(**OPTIONS)
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


# -- load generators -----------------------------------------------------------


def _client_factory(
    url: str, headers: list[str], protocol: Any, deflate: bool = False
) -> WebSocketClientFactory:
    parsed = {}
    for line in headers:
        name, _, value = line.partition(":")
        parsed[name.strip()] = value.strip()
    factory = WebSocketClientFactory(url, headers=parsed)
    factory.protocol = protocol
    factory.noisy = False
    factory.setProtocolOptions(**OPTIONS)
    if deflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=[
                PerMessageDeflateOffer(accept_no_context_takeover=False, accept_max_window_bits=True)
            ],
            perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response),
        )
    return factory


def _connect(url: str, factory: WebSocketClientFactory) -> Any:
    """Deferred firing with the protocol once its WebSocket is open."""
    parts = urlsplit(url)
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname or "127.0.0.1", parts.port or 80, 30)
    d: Any = endpoint.connect(factory)
    return d.addCallback(lambda proto: proto.is_open.addCallback(lambda _: proto))


def _stop() -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    emit({"error": message})
    _stop()


class _Pump(_FastSend, WebSocketClientProtocol):  # type: ignore[misc]
    run: _Throughput

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.run.echoed(self, len(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.run.closed(self, code, reason)


class _Throughput:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.payload = b"\xa5" * args.size
        self.protos: list[_Pump] = []
        self.messages = 0
        self.bytes = 0
        self.measuring = False
        self.stopping = False
        self.started = 0.0
        self.cpu = 0.0
        self.result: dict[str, Any] | None = None

    def start(self) -> None:
        class Pump(_Pump):
            run = self

        factory = _client_factory(self.args.url, self.args.header, Pump)
        ds = [_connect(self.args.url, factory) for _ in range(self.args.connections)]
        gatherResults(ds, consumeErrors=True).addCallbacks(self.opened, self.failed)

    def failed(self, failure: Any) -> None:
        _fail(f"throughput: could not open the sessions: {failure.value!r}")

    def opened(self, protos: list[_Pump]) -> None:
        self.protos = protos
        for proto in protos:
            for _ in range(self.args.window):
                proto.sendMessage(self.payload, isBinary=True)
        reactor.callLater(self.args.warmup, self.mark)

    def mark(self) -> None:
        self.messages = self.bytes = 0
        self.measuring = True
        self.started = time.perf_counter()
        self.cpu = time.process_time()
        reactor.callLater(self.args.duration, self.finish)

    def echoed(self, proto: _Pump, n: int) -> None:
        if self.stopping:
            return
        if self.measuring:
            self.messages += 1
            self.bytes += n
        proto.sendMessage(self.payload, isBinary=True)

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        self.stopping = True
        cpu = (time.process_time() - self.cpu) / seconds
        self.result = {
            "messages": self.messages, "bytes": self.bytes, "seconds": seconds, "cpu": cpu,
        }
        emit(self.result)
        for proto in self.protos:
            transport: Any = proto.transport
            if transport is not None:
                transport.abortConnection()
        reactor.callLater(0, _stop)

    def closed(self, proto: _Pump, code: int | None, reason: str | None) -> None:
        if not self.stopping and self.protos:
            self.stopping = True
            _fail(f"throughput: a session closed mid-run ({code} {reason})")


def run_throughput(args: argparse.Namespace) -> None:
    raise_nofile()
    _Throughput(args).start()
    reactor.run()


#: What each compressed idle session sends once: terminal-like text.
IDLE_MESSAGE = ("\x1b[32muser@sandbox\x1b[0m:~/project$ ls -la\r\n" * 24)[:1024].encode()


class _IdleClient(_FastSend, WebSocketClientProtocol):  # type: ignore[misc]
    owner: _Idle

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.owner.echoed += 1
        self.owner.launch()


class _Idle:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        owner = self

        class Client(_IdleClient):
            pass

        Client.owner = owner
        self.factory = _client_factory(args.url, args.header, Client, args.deflate)
        self.protos: list[Any] = []
        self.echoed = 0
        self.launched = 0
        self.failed = 0
        self.error: str | None = None
        self.reported = False

    def launch(self) -> None:
        in_flight = self.launched - len(self.protos) - self.failed
        while (
            self.error is None
            and self.launched < self.args.count
            and in_flight < self.args.concurrency
        ):
            self.launched += 1
            in_flight += 1
            _connect(self.args.url, self.factory).addCallbacks(self.opened, self.refused)
        echoes_due = self.args.deflate and self.echoed < len(self.protos)
        if in_flight == 0 and not echoes_due and not self.reported:
            self.reported = True
            compressed = sum(1 for p in self.protos if p.websocket_extensions_in_use)
            emit(
                {
                    "opened": len(self.protos),
                    "compressed": compressed,
                    "failed": self.failed,
                    "error": self.error,
                }
            )
            threading.Thread(target=self.wait_stdin, daemon=True).start()

    def opened(self, proto: Any) -> None:
        self.protos.append(proto)
        if self.args.deflate:
            proto.sendMessage(IDLE_MESSAGE, isBinary=False)
        self.launch()

    def refused(self, failure: Any) -> None:
        self.failed += 1
        if self.error is None:
            self.error = f"session {self.launched}: {failure.value!r}"[:300]
        self.launch()

    def wait_stdin(self) -> None:
        sys.stdin.readline()
        reactor.callFromThread(self.drop)

    def drop(self) -> None:
        for proto in self.protos:
            if proto.transport is not None:
                proto.transport.abortConnection()
        reactor.callLater(0, _stop)


def run_idle(args: argparse.Namespace) -> None:
    raise_nofile()
    reactor.callWhenRunning(_Idle(args).launch)
    reactor.run()


@implementer(IPushProducer)
class _BigSender:
    """Streams one single-frame message of C{size} bytes, pausing when asked."""

    def __init__(self, proto: Any, size: int) -> None:
        self.proto = proto
        self.remaining = size
        self.chunk = b"\x5a" * CHUNK
        self.paused = False
        proto.beginMessage(isBinary=True)
        proto.beginMessageFrame(size)
        proto.transport.registerProducer(self, True)
        reactor.callLater(0, self.pump)

    def pump(self) -> None:
        while not self.paused and self.remaining > 0:
            n = min(CHUNK, self.remaining)
            self.remaining -= n
            self.proto.sendMessageFrameData(self.chunk if n == CHUNK else self.chunk[:n])
        if self.remaining == 0 and self.proto.transport is not None:
            self.proto.transport.unregisterProducer()
            self.proto.endMessage()
            self.remaining = -1

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.remaining = -1


class _BigClient(_FastSend, WebSocketClientProtocol):  # type: ignore[misc]
    size = 0
    started = 0.0
    done = False

    def onOpen(self) -> None:
        self.started = time.perf_counter()
        _BigSender(self, self.size)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        seconds = time.perf_counter() - self.started
        got = int(payload)
        if got != self.size:
            _fail(f"big: the sink saw {got} bytes of {self.size}")
            return
        emit({"bytes": got, "seconds": seconds})
        self.done = True
        transport: Any = self.transport
        transport.abortConnection()
        reactor.callLater(0, _stop)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.done:
            _fail(f"big: session closed before the sink answered ({code} {reason})")


def run_big(args: argparse.Namespace) -> None:
    raise_nofile()

    class Big(_BigClient):
        size = args.size

    factory = _client_factory(args.url, args.header, Big)
    _connect(args.url, factory).addErrback(lambda f: _fail(f"big: could not open: {f.value!r}"))
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backend").set_defaults(run=run_backend)
    for name, run in (("throughput", run_throughput), ("idle", run_idle), ("big", run_big)):
        p = sub.add_parser(name)
        p.add_argument("url")
        p.add_argument("--header", action="append", default=[], help="'Name: value'")
        p.set_defaults(run=run)
        if name == "throughput":
            p.add_argument("--size", type=int, required=True)
            p.add_argument("--connections", type=int, default=8)
            p.add_argument("--window", type=int, default=16)
            p.add_argument("--warmup", type=float, default=1.0)
            p.add_argument("--duration", type=float, default=5.0)
        elif name == "idle":
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--concurrency", type=int, default=32)
            p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
        else:
            p.add_argument("--size", type=int, required=True)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
