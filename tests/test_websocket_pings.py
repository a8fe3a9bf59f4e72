"""
Keep-alive pings and their pongs never land inside a relayed data frame.

The relay writes each data frame to the other hop in pieces, as its payload
arrives.  A ping (the relay's own keep-alive timer) or a pong (Autobahn's
answer to a peer's ping) written at once would split that frame and the
receiving peer would see garbage (`invalid opcode`, `reserved bits`,
`incorrect masking`).  These tests stream many large messages both ways
while every party pings every few milliseconds; the client and the backend
are Autobahn, which fails the connection on any framing error.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from opensandbox_ingress import IngressService
from tests.helpers import start_ingress, wait_until
from tests.ws_backend import FrameStreamer, Message, WsBackend, connect_client

SANDBOXES = [{"name": "sbx", "endpoint": "127.0.0.1"}]

#: Message sizes: single-read ones, and ones that take many reads (and so
#: many pieces) to relay.
SIZES = [1, 125, 4096, 65_536, 300_000, 1 << 20]


class _Exchange:
    """
    Keeps C{window} messages in flight from C{client} to an echoing backend,
    checking each echo's SHA-256 against what was sent and dropping its
    bytes, until C{total} echoes are back.
    """

    def __init__(self, client: Any, total: int, window: int, seed: int) -> None:
        self.client = client
        self.total = total
        self.rng = random.Random(seed)
        self.expected: list[str] = []
        self.echoed = 0
        self.mismatches = 0
        self.sent_bytes = 0
        client.message_done = self._echoed
        for _ in range(window):
            self._send()

    def _send(self) -> None:
        if len(self.expected) >= self.total:
            return
        size = self.rng.choice(SIZES)
        payload = self.rng.randbytes(size)
        self.expected.append(hashlib.sha256(payload).hexdigest())
        self.sent_bytes += size
        self.client.sendMessage(payload, isBinary=True)

    def _echoed(self, message: Message) -> None:
        if message.digest != self.expected[self.echoed]:
            self.mismatches += 1
        self.echoed += 1
        message.data = None
        self.client.messages.clear()
        self._send()

    @property
    def done(self) -> bool:
        return self.echoed >= self.total


async def _run(
    tmp_path: Path, *, relay_ping: float, peer_ping: float, total: int
) -> tuple[_Exchange, Any, Any, IngressService]:
    backend = WsBackend(ping_interval=peer_ping).listen()
    service = await start_ingress(tmp_path, SANDBOXES, websocket_ping_interval_s=relay_ping)
    port = int(service.addresses()[0].port)
    client = await connect_client(port, f"sbx-{backend.port_number}", ping_interval=peer_ping)
    await wait_until(lambda: backend.opened, what="backend open")
    peer = backend.opened[-1]
    exchange = _Exchange(client, total=total, window=4, seed=total)
    try:
        await wait_until(
            lambda: exchange.done or client.closed or peer.closed,
            timeout=240,
            what=f"{total} echoes",
        )
    finally:
        closed = (client.closed, peer.closed)
        await service.stopService()
        await backend.stop()
    assert closed == (None, None), f"a peer saw a broken stream and closed: {closed}"
    return exchange, client, peer, service


@pytest_twisted.ensureDeferred
async def test_peer_pings_during_large_messages_leave_frames_intact(tmp_path: Path) -> None:
    """
    Client and backend ping every 3 ms while 2,000 messages of up to 1 MiB
    stream both ways: the relay's pongs wait for frame boundaries, so no
    message is lost or altered and neither strict peer fails the session.
    """
    exchange, client, peer, _ = await _run(tmp_path, relay_ping=0, peer_ping=0.003, total=2000)
    assert exchange.echoed == 2000
    assert exchange.mismatches == 0
    # The pings really did race the frames (Autobahn numbers its auto-pings).
    assert client.autoPingPendingSeq > 50 and peer.autoPingPendingSeq > 50
    assert exchange.sent_bytes > 200 * (1 << 20)


@pytest_twisted.ensureDeferred
async def test_relay_pings_during_large_messages_leave_frames_intact(tmp_path: Path) -> None:
    """
    The relay's own keep-alive ping every 5 ms, on both hops, while 2,000
    messages of up to 1 MiB stream both ways: every ping waits for a frame
    boundary, and both peers receive (and answer) hundreds of them.
    """
    exchange, client, peer, _ = await _run(tmp_path, relay_ping=0.005, peer_ping=0, total=2000)
    assert exchange.echoed == 2000
    assert exchange.mismatches == 0
    assert client.pings > 50 and peer.pings > 50


@pytest_twisted.ensureDeferred
async def test_long_frame_keeps_both_hops_past_the_ping_timeout(tmp_path: Path) -> None:
    """
    One 5 MiB frame trickles from the client for about 2 s, with the relay
    pinging every 0.1 s and dropping a hop after 0.5 s without a pong: the
    client (which cannot answer inside its own frame) is alive because its
    payload keeps coming, and the backend (whose ping waits behind the
    frame) because it keeps reading; the session survives, byte-exact.
    """
    backend = WsBackend().listen()
    service = await start_ingress(
        tmp_path, SANDBOXES, websocket_ping_interval_s=0.1, idle_timeout_s=0.5
    )
    try:
        port = int(service.addresses()[0].port)
        client = await connect_client(port, f"sbx-{backend.port_number}")
        # A sender mid-frame cannot pong; this one does not even try later.
        client.onPing = lambda payload: setattr(client, "pings", client.pings + 1)
        await wait_until(lambda: backend.opened, what="backend open")
        peer = backend.opened[-1]
        chunk, count = 64 * 1024, 80
        payload = random.Random(5).randbytes(chunk * count)
        client.beginMessage(isBinary=True)
        client.beginMessageFrame(len(payload))

        def trickle(i: int) -> None:
            if client.state != client.STATE_OPEN:
                return
            client.sendMessageFrameData(payload[i * chunk : (i + 1) * chunk])
            if i + 1 < count:
                reactor.callLater(0.025, trickle, i + 1)
            else:
                client.endMessage()

        started = time.monotonic()
        trickle(0)
        await wait_until(
            lambda: client.messages or client.closed or peer.closed, timeout=30, what="the echo"
        )
        assert (client.closed, peer.closed) == (None, None)
        assert client.messages[0].digest == hashlib.sha256(payload).hexdigest()
        # The client's ping went unanswered for several pong timeouts.
        assert client.pings >= 1
        assert time.monotonic() - started > 3 * 0.5
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_peer_that_stops_reading_mid_frame_is_still_dropped(tmp_path: Path) -> None:
    """
    A client that stops reading while a large frame is relayed to it leaves
    the relay's ping held behind that frame; since the client is not
    reading, the pong timeout (0.5 s) still drops it and the backend's
    session ends too.
    """
    backend = WsBackend().listen()
    service = await start_ingress(
        tmp_path, SANDBOXES, websocket_ping_interval_s=0.1, idle_timeout_s=0.5
    )
    try:
        port = int(service.addresses()[0].port)
        client = await connect_client(port, f"sbx-{backend.port_number}", rcvbuf=4096)
        await wait_until(lambda: backend.opened, what="backend open")
        peer = backend.opened[-1]
        client.transport.pauseProducing()
        streamer = FrameStreamer(peer, 256 * 1024 * 1024)
        await wait_until(lambda: peer.closed, timeout=20, what="the session to end")
        assert streamer.sent < 256 * 1024 * 1024
        await wait_until(lambda: not service.websocket.sessions, what="no session left")
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_close_answer_waits_for_the_frame_being_relayed(tmp_path: Path) -> None:
    """
    A client that closes while a large frame is half relayed to it gets
    the whole message first, then the ingress's answer to its close: a
    clean 1000, not a close frame written inside the frame.
    """
    backend = WsBackend().listen()
    backend.echo = False
    service = await start_ingress(tmp_path, SANDBOXES, websocket_ping_interval_s=0)
    try:
        port = int(service.addresses()[0].port)
        client = await connect_client(port, f"sbx-{backend.port_number}", rcvbuf=64 * 1024)
        await wait_until(lambda: backend.opened, what="backend open")
        session = next(iter(service.websocket.sessions))
        client.transport.pauseProducing()
        payload = random.Random(7).randbytes(8 << 20)
        # One frame, whole in the backend's send buffer: its own close
        # answer cannot split it.
        backend.opened[-1].sendMessage(payload, isBinary=True)
        await wait_until(
            lambda: session.client.frame_half_written() and session.throttles[0].paused,
            what="the frame half relayed, the client not reading",
        )
        client.closeHandshakeTimeout = 30  # the answer comes after 8 MiB
        client.sendClose(1000, "bye")
        await wait_until(lambda: session.client.held_reply is not None, what="the answer held")
        client.transport.resumeProducing()
        await wait_until(lambda: client.closed, timeout=15, what="client closed")
        assert client.closed[:2] == (True, 1000), client.closed
        assert [m.digest for m in client.messages] == [hashlib.sha256(payload).hexdigest()]
    finally:
        await service.stopService()
        await backend.stop()
