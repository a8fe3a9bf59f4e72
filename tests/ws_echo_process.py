"""
A WebSocket echo backend run as its own process (``python -m tests.ws_echo_process``):
prints its port, echoes messages, and prints ``CLOSE <code>`` when a peer
closes the session.
"""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):  # type: ignore[misc]
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        sys.stdout.write(f"CLOSE {code}\n")
        sys.stdout.flush()
        return super().onCloseFrame(code, reasonRaw)


def main() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
