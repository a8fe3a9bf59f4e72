"""
The pure parts of OSEP-0009 renew intents, tested without a reactor: the
exact JSON the OpenSandbox server consumes (L{intent_payload}), the
per-sandbox throttle (L{RenewThrottle}: at most one intent per sandbox per
interval, with state bounded by the sandboxes active in that interval), and
DSN masking for logs.  L{opensandbox_ingress.renew} publishes with them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_MASK = "***"


def format_observed_at(observed_at: datetime | float) -> str:
    """
    Render a time as RFC 3339 UTC with microseconds and a C{Z} suffix,
    e.g. C{2026-11-28T17:05:09.123456Z}.

    @param observed_at: an aware C{datetime} (any zone; naive ones are taken
        as UTC) or Unix seconds.
    """
    if isinstance(observed_at, datetime):
        if observed_at.tzinfo is None:
            dt = observed_at
        else:
            dt = observed_at.astimezone(timezone.utc).replace(tzinfo=None)
    else:
        dt = datetime.fromtimestamp(observed_at, timezone.utc).replace(tzinfo=None)
    # isoformat pads the year to four digits (strftime's %Y does not on
    # glibc) and, with timespec, always writes the fraction.
    return dt.isoformat(timespec="microseconds") + "Z"


def intent_payload(
    sandbox_id: str, observed_at: datetime | float, port: int, request_uri: str
) -> bytes:
    """
    The JSON document of one renew intent, exactly as the OpenSandbox server
    reads it: compact, keys in the order C{sandbox_id}, C{observed_at},
    C{port}, C{request_uri}; C{port} omitted when 0 and C{request_uri} when
    empty (as upstream's Go C{omitempty} does).

    The output is ASCII (non-ASCII characters are C{\\u} escaped), so it
    cannot fail to encode whatever the request carried.
    """
    doc: dict[str, Any] = {
        "sandbox_id": sandbox_id,
        "observed_at": format_observed_at(observed_at),
    }
    if port:
        doc["port"] = port
    if request_uri:
        doc["request_uri"] = request_uri
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def mask_dsn(dsn: str) -> str:
    """
    C{dsn} with its password (in the user info or a C{password} query
    parameter) replaced by C{***}, fit for logs.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hostport}"
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, _MASK if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class RenewThrottle:
    """
    At most one admitted intent per sandbox per C{min_interval_s} seconds.

    Ownership: the reactor thread (not thread-safe).  State holds one entry
    per sandbox admitted within roughly the last interval: entries are kept
    in admission order, and each call evicts a few expired ones from the
    front, so cleanup is amortised O(1) and there is never a pause to sweep
    every sandbox ever seen.
    """

    #: Expired entries evicted per call at most, so that one call stays O(1);
    #: each call adds at most one entry, so the backlog never grows.
    EVICT_PER_CALL = 16

    def __init__(self, min_interval_s: float, now: Callable[[], float] | Any) -> None:
        """
        @param min_interval_s: seconds between two admitted intents for one
            sandbox; 0 admits everything and keeps no state.
        @param now: a callable returning seconds, or an C{IReactorTime}
            (its C{seconds} is used), so tests drive time with a C{Clock}.
        """
        self._interval = float(min_interval_s)
        self._now: Callable[[], float] = now.seconds if hasattr(now, "seconds") else now
        # sandbox id -> time it was last admitted, oldest first.
        self._last: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """Number of sandboxes currently remembered."""
        return len(self._last)

    def admit(self, sandbox_id: str) -> bool:
        """
        Whether an intent for C{sandbox_id} may go out now; if so, start a
        new interval for it.
        """
        if self._interval <= 0:
            return True
        now = self._now()
        self._evict(now)
        last = self._last.get(sandbox_id)
        # A clock that went backwards (wall clock reset) admits rather than
        # silencing the sandbox for the size of the jump.
        if last is not None and 0 <= now - last < self._interval:
            return False
        self._last[sandbox_id] = now
        self._last.move_to_end(sandbox_id)
        return True

    def admitted_at(self, sandbox_id: str) -> float | None:
        """When C{sandbox_id} was last admitted (throttle clock), if remembered."""
        return self._last.get(sandbox_id)

    def forget(self, sandbox_id: str, admitted_at: float | None = None) -> None:
        """
        Undo the admission of C{sandbox_id} (its intent was dropped), so the
        next offer for it is admitted.

        @param admitted_at: undo only the admission made at that time (as
            L{admitted_at} reported it); a later admission, whose intent may
            still be on its way, is kept.  C{None} undoes whatever is there.
        """
        if admitted_at is None or self._last.get(sandbox_id) == admitted_at:
            self._last.pop(sandbox_id, None)

    def _evict(self, now: float) -> None:
        last = self._last
        for _ in range(self.EVICT_PER_CALL):
            if not last:
                return
            sandbox_id, admitted = next(iter(last.items()))
            if 0 <= now - admitted < self._interval:
                return
            del last[sandbox_id]
