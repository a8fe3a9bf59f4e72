"""
Ordered failure: a peer that violates the protocol is failed only after the
other peer's answers to what came before have reached it.

An endpoint that sees a bad frame has already answered the frames before
it; through a relay that answer comes from the other peer and may be in
flight.  The relay stops reading the violating peer, closes the other one
(1001), delivers its frames until its close reply, then fails the violating
peer with Autobahn's code (1002 protocol error, 1007 invalid UTF-8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from opensandbox_ingress.web.websocket import _hop
from tests.helpers import start_ingress, wait_until
from tests.ws_backend import WsBackend, connect_client

SANDBOXES = [{"name": "sbx", "endpoint": "127.0.0.1"}]


async def _open(tmp_path: Path) -> tuple[Any, WsBackend, Any, Any, Any]:
    backend = WsBackend().listen()
    backend.echo = False
    service = await start_ingress(tmp_path, SANDBOXES, websocket_ping_interval_s=0)
    port = int(service.addresses()[0].port)
    client = await connect_client(port, f"sbx-{backend.port_number}")
    await wait_until(lambda: backend.opened, what="backend open")
    session = next(iter(service.websocket.sessions))
    return service, backend, client, backend.opened[-1], session


def _violate(peer: Any, kind: str) -> None:
    """Send C{peer}'s partner a frame that breaks the protocol."""
    if kind == "reserved-bits":
        peer.sendFrame(opcode=1, payload=b"bad", rsv=2)
    elif kind == "invalid-utf8-fragment":
        # A valid first fragment (streamed on), then one that breaks UTF-8.
        peer.sendFrame(opcode=1, payload=b"fine so far", fin=False)
        peer.sendFrame(opcode=0, payload=b"\xed\xa0\x80", fin=True)
    else:  # invalid UTF-8 in a one-frame text message
        peer.sendFrame(opcode=1, payload=b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")


EXPECTED_CODE = {"reserved-bits": 1002, "invalid-utf8": 1007, "invalid-utf8-fragment": 1007}


@pytest.mark.parametrize("kind", list(EXPECTED_CODE))
@pytest.mark.parametrize("violator", ["client", "backend"])
@pytest_twisted.ensureDeferred
async def test_answers_before_the_violation_still_arrive(
    tmp_path: Path, violator: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A valid message, then a violation: the other peer's answer, sent after
    the relay saw the violation, still reaches the violating peer, which is
    then failed with the right code; the other peer gets 1001 at once (not
    after the grace period), also when the bad frame follows a fragment
    already streamed to it.
    """
    monkeypatch.setattr(_hop, "FAIL_GRACE_S", 60.0)
    service, backend, client, peer, session = await _open(tmp_path)
    try:
        bad, good = (client, peer) if violator == "client" else (peer, client)
        bad_hop = session.client if violator == "client" else session.backend
        bad.sendMessage(b"question", isBinary=True)
        await wait_until(lambda: good.messages, what="the valid message relayed")
        # The good peer must not see the relay's close before it answers.
        good.transport.pauseProducing()
        _violate(bad, kind)
        await wait_until(lambda: bad_hop.failing, what="the violation seen")
        assert bad.closed is None  # not failed yet: an answer may be coming
        good.sendMessage(b"answer", isBinary=True)
        good.transport.resumeProducing()
        await wait_until(lambda: bad.closed and good.closed, timeout=10, what="both closed")
        assert [m.payload for m in bad.messages] == [b"answer"]
        assert bad.closed[1] == EXPECTED_CODE[kind]
        assert good.closed[1] == 1001
        assert good.closed[2].startswith("peer protocol error")
        await wait_until(lambda: not service.websocket.sessions, what="session finished")
        assert (session.close_code, session.closed_by) == (EXPECTED_CODE[kind], violator)
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_silent_partner_cannot_hold_a_failing_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that never answers the relay's close is cut after the grace period."""
    monkeypatch.setattr(_hop, "FAIL_GRACE_S", 0.5)
    service, backend, client, peer, session = await _open(tmp_path)
    try:
        peer.transport.pauseProducing()  # never reads the close
        _violate(client, "reserved-bits")
        await wait_until(lambda: client.closed, timeout=10, what="client failed")
        assert client.closed[1] == 1002
        await wait_until(lambda: not service.websocket.sessions, what="session finished")
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_message_after_the_clients_close_is_dropped_quietly(tmp_path: Path) -> None:
    """
    The client closes; the backend, told by the relay's close, sends one
    more message before its close reply.  That message has nowhere to go
    (the client hop is closing): it is dropped, both hops close cleanly and
    nothing is logged as an error (Autobahn raises when a whole message is
    sent to a hop that is not open).
    """
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    service, backend, client, peer, session = await _open(tmp_path)
    try:
        original = peer.onCloseFrame

        def last_word(code: int | None, reason: Any) -> Any:
            # Before the close reply: a data frame the client can no longer get.
            peer.sendMessage(b"too late", isBinary=True)
            return original(code, reason)

        peer.onCloseFrame = last_word
        client.sendClose(code=1000)
        await wait_until(lambda: client.closed and peer.closed, timeout=10, what="both closed")
        await wait_until(lambda: not service.websocket.sessions, what="session finished")
        assert client.closed[0] is True and client.closed[1] == 1000
        assert peer.closed[0] is True and peer.closed[1] == 1000
        assert client.messages == []
        assert failures == []
    finally:
        globalLogPublisher.removeObserver(observe)
        await service.stopService()
        await backend.stop()
