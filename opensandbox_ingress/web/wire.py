"""
Writing to client and backend transports on the hot path: a direct socket
send when nothing is queued, and the C{Date} value cached per second.

Ownership: reactor thread only.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.web.http import datetimeToString

#: Transports whose socket L{send} may write to directly.
_DIRECT = (tcp.Server, tcp.Client)


def send(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but try the socket first when nothing is
    queued: Twisted's write always waits for the next reactor turn (an
    epoll registration and a dispatch per write), a third of a small
    request's cost.  Only plain TCP transports qualify; a partial send
    queues the rest through Twisted as usual.
    """
    if (
        type(transport) in _DIRECT
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport.TLS
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted meet the error on its own write path.
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


_date: list[Any] = [0, b""]


def http_date(now: float) -> bytes:
    second = int(now)
    if _date[0] != second:
        _date[0] = second
        _date[1] = datetimeToString(second)
    return _date[1]  # type: ignore[no-any-return]


