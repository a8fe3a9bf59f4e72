"""
permessage-deflate on the client hop (RFC 7692): negotiated with clients
that offer it, never with the backend; inflated in bounded steps under
backpressure, so a decompression bomb costs no more memory than any other
message; the message-size limit counts inflated bytes.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport

from opensandbox_ingress import IngressService
from opensandbox_ingress.web.websocket import COLLECT_LIMIT
from opensandbox_ingress.web.websocket._deflate import (
    INFLATE_CHUNK,
    Deflate,
    Inflater,
    accept_offer,
    message_window_bits,
    negotiate,
)
from opensandbox_ingress.web.websocket._hop import Throttle
from tests.helpers import start_ingress, wait_until
from tests.processes import rss_kib
from tests.ws_backend import FrameStreamer, WsBackend, connect_client

MIB = 1024 * 1024
SANDBOXES = [{"name": "sbx", "endpoint": "127.0.0.1"}]
BOTH_OFF = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


# -- negotiation (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("offers", "response", "window"),
    [
        # Chrome's and Firefox's offer.
        ([("permessage-deflate", {"client_max_window_bits": [True]})], BOTH_OFF, 15),
        ([("permessage-deflate", {})], BOTH_OFF, 15),
        (
            [("permessage-deflate", {"server_no_context_takeover": [True]})],
            BOTH_OFF,
            15,
        ),
        (
            [("permessage-deflate", {"server_max_window_bits": ["10"]})],
            BOTH_OFF + "; server_max_window_bits=10",
            10,
        ),
        (
            [("permessage-deflate", {"client_max_window_bits": ["9"]})],
            BOTH_OFF,
            15,
        ),
        # zlib cannot compress with a 256-byte window: the next offer.
        (
            [
                ("permessage-deflate", {"server_max_window_bits": ["8"]}),
                ("permessage-deflate", {"server_max_window_bits": ["12"]}),
            ],
            BOTH_OFF + "; server_max_window_bits=12",
            12,
        ),
        # Unknown extensions are skipped.
        ([("x-webkit-deflate-frame", {}), ("permessage-deflate", {})], BOTH_OFF, 15),
        # Offers that must be declined (RFC 7692 section 5), one by one.
        ([("permessage-deflate", {"mystery": [True]})], None, 0),
        ([("permessage-deflate", {"server_no_context_takeover": [True, True]})], None, 0),
        ([("permessage-deflate", {"server_no_context_takeover": ["1"]})], None, 0),
        ([("permessage-deflate", {"server_max_window_bits": [True]})], None, 0),
        ([("permessage-deflate", {"server_max_window_bits": ["16"]})], None, 0),
        ([("permessage-deflate", {"server_max_window_bits": ["010"]})], None, 0),
        ([("permessage-deflate", {"client_max_window_bits": ["7"]})], None, 0),
        ([("permessage-deflate", {"client_max_window_bits": ["x"]})], None, 0),
        ([("x-webkit-deflate-frame", {})], None, 0),
        ([], None, 0),
    ],
)
def test_negotiation_accepts_the_first_acceptable_offer(
    offers: list[tuple[str, dict[str, list[Any]]]], response: str | None, window: int
) -> None:
    """The first offer the ingress can honour is answered; the others are declined."""
    agreement = negotiate(offers)
    if response is None:
        assert agreement is None
        return
    assert agreement is not None
    assert (agreement.response, agreement.window_bits) == (response, window)


def test_declined_offer_alone_is_none() -> None:
    """accept_offer declines an offer whose parameter it does not know."""
    assert accept_offer({"client_max_window_bits": [True], "other": [True]}) is None


@pytest.mark.parametrize(
    ("size", "limit", "bits"),
    [(None, 15, 15), (0, 15, 9), (1000, 15, 11), (COLLECT_LIMIT, 15, 15), (MIB, 12, 12)],
)
def test_message_window_is_no_larger_than_the_message(size: int | None, limit: int, bits: int) -> None:
    """A known small message is compressed with a window it fills, never above the agreed one."""
    assert message_window_bits(size, limit) == bits


def _inflate_all(compressed: Iterable[bytes]) -> Iterator[bytes]:
    inflater = Inflater()
    for data in compressed:
        inflater.feed(data)
        while inflater.pending:
            yield inflater.step()
    inflater.finish()
    while inflater.pending:
        yield inflater.step()


def test_inflater_steps_are_bounded() -> None:
    """64 MiB that compress to 64 KiB come out in steps of at most INFLATE_CHUNK, all of them."""
    compress = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = b"\0" * (64 * MIB)
    compressed = compress.compress(payload) + compress.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(compressed) < 128 * 1024
    steps = list(_inflate_all([compressed[: len(compressed) // 2], compressed[len(compressed) // 2 :]]))
    assert max(len(s) for s in steps) <= INFLATE_CHUNK
    assert b"".join(steps) == payload


def test_deflate_output_inflates_back_per_message() -> None:
    """Each message is compressed on its own (no context takeover) and inflates back exactly."""
    deflate = Deflate(negotiate([("permessage-deflate", {})]))  # type: ignore[arg-type]
    for payload in (b"", b"hello " * 1000, os.urandom(3000)):
        deflate.size_hint = len(payload)
        deflate.start_compress_message()
        out = deflate.compress_message_data(payload) + deflate.end_compress_message()
        assert b"".join(_inflate_all([out])) == payload


def test_throttle_resumes_the_other_transport_then_calls_back() -> None:
    """The backend transport's throttle resumes the client's reading, then lets the hop inflate on."""
    source = StringTransport()
    calls: list[str] = []
    throttle = Throttle(source, lambda: calls.append(source.producerState))
    throttle.pauseProducing()
    assert (source.producerState, throttle.paused, calls) == ("paused", True, [])
    throttle.resumeProducing()
    assert (source.producerState, throttle.paused, calls) == ("producing", False, ["producing"])


# -- through a running ingress --------------------------------------------------------


async def _ingress(tmp_path: Path, **overrides: Any) -> IngressService:
    overrides.setdefault("websocket_ping_interval_s", 0)
    return await start_ingress(tmp_path, SANDBOXES, **overrides)


async def _open(port: int, backend: WsBackend, **kwargs: Any) -> tuple[Any, Any]:
    before = len(backend.opened)
    client = await connect_client(port, f"sbx-{backend.port_number}", **kwargs)
    await wait_until(lambda: len(backend.opened) > before, what="backend open")
    return client, backend.opened[-1]


def send_compressed(peer: Any, chunks: Iterable[bytes], binary: bool = True, level: int = 6) -> None:
    """
    Send one message compressed as RFC 7692 says, one frame per chunk
    (the last one final), whatever the peer's own extension would do.
    """
    compress = zlib.compressobj(level, zlib.DEFLATED, -15)
    # Each frame flushed, so that it inflates to its own chunk.
    frames = [compress.compress(chunk) + compress.flush(zlib.Z_SYNC_FLUSH) for chunk in chunks]
    frames[-1] = frames[-1][:-4]
    for i, frame in enumerate(frames):
        peer.sendFrame(
            opcode=(2 if binary else 1) if i == 0 else 0,
            payload=frame,
            fin=i == len(frames) - 1,
            rsv=4 if i == 0 else 0,
        )


@pytest_twisted.ensureDeferred
async def test_browser_offer_compresses_the_client_hop_only(
    tmp_path: Path, ws_backend: WsBackend
) -> None:
    """
    A browser's offer is accepted without context takeover; the backend is
    offered nothing and sees plain frames; payloads and message boundaries
    are exact both ways; a small message is one frame on the other hop.
    """
    ws_backend.echo = False
    service = await _ingress(tmp_path)
    try:
        client, backend = await _open(service.addresses()[0].port, ws_backend, deflate=True)
        assert client.response.headers["sec-websocket-extensions"] == BOTH_OFF
        assert [str(e) for e in client.websocket_extensions_in_use] != []
        assert not [n for n, _ in ws_backend.header_lines() if n.lower() == "sec-websocket-extensions"]
        assert backend.websocket_extensions_in_use == []
        text = "ls -la ünïcode\n" * 50
        large = (b"0123456789abcdef" * 20000) + os.urandom(1000)  # > COLLECT_LIMIT inflated
        client.sendMessage(text.encode(), isBinary=False)
        client.sendMessage(b"", isBinary=True)
        client.sendMessage(large, isBinary=True)
        send_compressed(client, [b"frag-one ", b"frag-two ", b"frag-three"], binary=False)
        backend.sendMessage(text.encode(), isBinary=False)
        backend.sendMessage(b"", isBinary=True)
        backend.sendMessage(large, isBinary=True)
        await wait_until(lambda: len(backend.messages) == 4, what="messages at the backend")
        await wait_until(lambda: len(client.messages) == 3, what="messages at the client")
        up = backend.messages
        assert [(m.binary, m.payload) for m in up] == [
            (False, text.encode()),
            (True, b""),
            (True, large),
            (False, b"frag-one frag-two frag-three"),
        ]
        # One frame per message on the backend hop, inflated lengths.
        assert up[0].frames == [len(text.encode())]
        assert up[1].frames == [0]
        assert len(up[2].frames) > 1 and max(up[2].frames) <= COLLECT_LIMIT + INFLATE_CHUNK
        assert up[3].frames[:3] == [9, 9, 10]
        down = client.messages
        assert [(m.binary, m.payload) for m in down] == [
            (False, text.encode()),
            (True, b""),
            (True, large),
        ]
        # Compressed on the client hop: one frame, much shorter than the text.
        assert len(down[0].frames) == 1 and down[0].frames[0] < len(text) // 5
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_compression_off_declines_every_offer(tmp_path: Path, ws_backend: WsBackend) -> None:
    """With --websocket-compression off the offer is declined and messages pass plain."""
    service = await _ingress(tmp_path, websocket_compression=False)
    try:
        client, backend = await _open(service.addresses()[0].port, ws_backend, deflate=True)
        assert "sec-websocket-extensions" not in client.response.headers
        assert client.websocket_extensions_in_use == []
        client.sendMessage(b"plain " * 100, isBinary=True)
        await wait_until(lambda: len(client.messages) == 1, what="echo")
        assert client.messages[0].payload == b"plain " * 100
        assert client.messages[0].frames == [600]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_message_limit_counts_inflated_bytes(tmp_path: Path, ws_backend: WsBackend) -> None:
    """
    Under --websocket-max-message-bytes, a message that inflates to exactly
    the limit passes; one that inflates past it (from a few KiB) fails its
    sender with 1009 and closes the backend with 1001.
    """
    ws_backend.echo = False
    service = await _ingress(tmp_path, websocket_max_message_bytes=MIB)
    try:
        client, backend = await _open(service.addresses()[0].port, ws_backend, deflate=True)
        send_compressed(client, [b"a" * MIB])
        await wait_until(lambda: backend.messages, what="the message at the limit")
        assert backend.messages[0].size == MIB
        send_compressed(client, [b"b" * (MIB + 1)])
        await wait_until(lambda: client.closed and backend.closed, timeout=15, what="both closed")
        assert client.closed[1] == 1009
        assert backend.closed[1] == 1001
        assert len(backend.messages) == 1
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_message_limit_applies_to_plain_messages(tmp_path: Path, ws_backend: WsBackend) -> None:
    """A plain message past the limit from the backend fails the backend with 1009."""
    ws_backend.echo = False
    service = await _ingress(tmp_path, websocket_max_message_bytes=MIB)
    try:
        client, backend = await _open(service.addresses()[0].port, ws_backend)
        backend.sendMessage(b"c" * (MIB + 1), isBinary=True)
        await wait_until(lambda: client.closed and backend.closed, timeout=15, what="both closed")
        assert backend.closed[1] == 1009
        assert client.closed[1] == 1001
        assert client.messages == []
    finally:
        await service.stopService()


# -- memory, measured on the ingress process -------------------------------------------




async def _warm(port: int, backend: WsBackend) -> tuple[Any, Any]:
    client, peer = await _open(port, backend, deflate=True)
    assert client.websocket_extensions_in_use
    client.sendMessage(b"warm-up" * 1000, isBinary=True)
    peer.sendMessage(b"warm-up" * 1000, isBinary=True)
    await wait_until(lambda: peer.messages and client.messages, what="warm-up both ways")
    return client, peer


def _pattern(total: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(total // chunk):
        yield bytes([i % 7]) * chunk


@pytest_twisted.ensureDeferred
async def test_compressed_256_mib_messages_keep_ingress_rss_flat(
    ingress_process: tuple[Any, int], ws_backend: WsBackend
) -> None:
    """
    A 256 MiB message each way on a compressed client hop passes byte-exact
    (inflated toward the backend, deflated toward the client); the
    ingress's peak RSS grows < 64 MiB.
    """
    proc, port = ingress_process
    ws_backend.echo = False
    client, backend = await _warm(port, ws_backend)
    baseline = rss_kib(proc.pid)
    total = 256 * MIB
    digest = __import__("hashlib").sha256()
    for chunk in _pattern(total):
        digest.update(chunk)
    # Streamed as compressed frames of 256 KiB inflated each, as a browser
    # library streaming a large message would.
    send_compressed(client, _pattern(total))
    await wait_until(lambda: len(backend.messages) == 2, timeout=120, what="256 MiB up")
    assert (backend.messages[1].size, backend.messages[1].digest) == (total, digest.hexdigest())
    down = FrameStreamer(backend, total)
    await wait_until(lambda: len(client.messages) == 2, timeout=120, what="256 MiB down")
    assert (client.messages[1].size, client.messages[1].digest) == (total, down.sha256.hexdigest())
    growth = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    assert growth < 64, f"ingress peak RSS grew {growth:.1f} MiB"


@pytest_twisted.ensureDeferred
async def test_decompression_bomb_is_inflated_under_backpressure(
    ingress_process: tuple[Any, int], ws_backend: WsBackend
) -> None:
    """
    One frame of about 256 KiB that inflates to 256 MiB reaches the backend
    whole and exact, while the ingress's peak RSS grows < 64 MiB (a relay
    that inflates a read at once, or ignores the backend's pace, holds
    hundreds of MiB).
    """
    proc, port = ingress_process
    ws_backend.echo = False
    client, backend = await _warm(port, ws_backend)
    baseline = rss_kib(proc.pid)
    total = 256 * MIB
    compress = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = b"".join(compress.compress(b"\0" * (16 * MIB)) for _ in range(16))
    bomb += compress.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 512 * 1024
    client.sendFrame(opcode=2, payload=bomb, fin=True, rsv=4)
    await wait_until(lambda: len(backend.messages) == 2, timeout=120, what="the bomb relayed")
    expected = __import__("hashlib").sha256(b"\0" * total).hexdigest()
    assert (backend.messages[1].size, backend.messages[1].digest) == (total, expected)
    growth = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    assert growth < 64, f"ingress peak RSS grew {growth:.1f} MiB"
