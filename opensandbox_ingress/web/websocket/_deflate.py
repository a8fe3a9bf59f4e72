"""
C{permessage-deflate} (RFC 7692) on the client hop: the negotiation (pure),
the per-message compressor Autobahn drives when it writes toward the
client, and a bounded inflater the client hop drives itself.

Memory is the design constraint.  The ingress always answers with
C{server_no_context_takeover; client_no_context_takeover} (a server may add
both to any offer, RFC 7692 sections 7.1.1.1 and 7.1.1.2), so no zlib
state outlives a message: an idle session that negotiated compression holds
no compressor, no inflater and no window.  The cost is ratio across
messages (each message is compressed on its own), which is what Go's
C{nhooyr.io/websocket} and C{gorilla/websocket} also default to.

Inflation is bounded: Autobahn's own extension inflates a whole read in one
call (unbounded unless a message limit is set), so a small frame of a
decompression bomb would expand to its full size in memory.  L{Inflater}
yields at most L{INFLATE_CHUNK} bytes per step and keeps the rest of its
input compressed, so the client hop can stop between steps while the
backend does not read (see C{_hop.ClientHop}).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

EXTENSION_NAME = "permessage-deflate"

#: Most bytes one inflate step yields; the client hop relays each step
#: before taking the next, so this bounds inflated data in memory.
INFLATE_CHUNK = 64 * 1024

#: The LZ77 window the ingress compresses with when the client sets no
#: C{server_max_window_bits}; a single message smaller than the window is
#: compressed with a smaller one (same output, less memory to set up).
DEFAULT_WINDOW_BITS = 15

#: zlib's memory level for the compressor: its default, 8 (about 256 KiB
#: with a 15-bit window while a message is being compressed, none between
#: messages).
MEM_LEVEL = 8

#: The empty stored block a sender strips from the end of each message
#: (RFC 7692 section 7.2.1) and a receiver appends again (section 7.2.2).
_TAIL = b"\x00\x00\xff\xff"

_PARAMETERS = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)

#: Window sizes zlib can compress with; RFC 7692 allows 8, which zlib's
#: raw deflate refuses, so an offer that requires it is declined.
_WINDOW_BITS = range(9, 16)


@dataclass(frozen=True)
class DeflateAgreement:
    """
    An accepted C{permessage-deflate} offer.

    @ivar window_bits: the most window bits the ingress may compress with.
    @ivar response: the C{Sec-WebSocket-Extensions} value of the 101.
    """

    window_bits: int
    response: str


def _window_bits(value: object) -> int | None:
    # RFC 7692 section 7.1.2: 1*DIGIT without leading zero, 8..15 (quotes
    # are already removed by Autobahn's header parser).
    if not isinstance(value, str) or not value.isdigit() or value.startswith("0"):
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def accept_offer(params: Mapping[str, Sequence[object]]) -> DeflateAgreement | None:
    """
    The agreement for one C{permessage-deflate} offer (its parameters as
    Autobahn parses them: name -> values, C{True} for a parameter without
    value), or None when it must be declined (RFC 7692 section 5: an
    unknown or repeated parameter, an invalid value, or a configuration the
    ingress cannot honour).
    """
    window = DEFAULT_WINDOW_BITS
    requested: int | None = None
    for name, values in params.items():
        if name not in _PARAMETERS or len(values) != 1:
            return None
        value = values[0]
        if name.endswith("_no_context_takeover"):
            if value is not True:
                return None
        elif name == "server_max_window_bits":
            requested = _window_bits(value)
            if requested is None or requested not in _WINDOW_BITS:
                return None
            window = min(window, requested)
        elif value is not True and _window_bits(value) is None:  # client_max_window_bits
            return None
    # The ingress inflates with a 15-bit window, which reads any smaller
    # one, so client_max_window_bits needs no answer; it never keeps a
    # context, so it asks the client not to keep one either.
    response = f"{EXTENSION_NAME}; server_no_context_takeover; client_no_context_takeover"
    if requested is not None:
        response += f"; server_max_window_bits={requested}"
    return DeflateAgreement(window, response)


def negotiate(
    offers: Iterable[tuple[str, Mapping[str, Sequence[object]]]],
) -> DeflateAgreement | None:
    """
    The first C{permessage-deflate} offer, in the client's order, that can
    be accepted (an offer that cannot falls back to the next one); None
    when there is none and the session goes uncompressed.
    """
    for name, params in offers:
        if name.lower() == EXTENSION_NAME:
            agreement = accept_offer(params)
            if agreement is not None:
                return agreement
    return None


def message_window_bits(size: int | None, limit: int) -> int:
    """
    The window to compress a message of C{size} bytes with (None: not
    known yet): no larger than the message needs, at most C{limit}.
    """
    if size is None:
        return limit
    return max(9, min(limit, (size + 262).bit_length()))


class Inflater:
    """
    Inflates one compressed message in bounded steps: C{feed} takes a
    frame's compressed payload, C{step} yields at most L{INFLATE_CHUNK}
    bytes, C{pending} says whether more steps are due.  Raises
    C{zlib.error} on corrupt data.  Owned by one client hop, one message
    at a time.
    """

    __slots__ = ("_inflate", "_input", "_full")

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(-15)
        self._input = b""
        #: The last step filled its chunk: zlib may hold output back (a
        #: match being copied) even with no input left.
        self._full = False

    def feed(self, data: bytes) -> None:
        """Take compressed bytes; only when no step is pending."""
        assert not self.pending
        self._input = data

    def finish(self) -> None:
        """The message's last frame has ended: take the stripped tail."""
        self.feed(_TAIL)

    @property
    def pending(self) -> bool:
        """True while fed bytes (or held-back output) remain."""
        return bool(self._input) or self._full

    def step(self) -> bytes:
        """The next at most L{INFLATE_CHUNK} inflated bytes."""
        inflate = self._inflate
        out = inflate.decompress(self._input, INFLATE_CHUNK)
        # After a final block, zlib keeps further bytes in unused_data:
        # ignored, as other implementations do.
        self._input = inflate.unconsumed_tail
        self._full = len(out) == INFLATE_CHUNK
        return out


class Deflate:
    """
    The C{permessage-deflate} processor of one client hop, in the shape
    Autobahn's protocol drives (C{_perMessageCompress}): it compresses
    what the ingress sends, one message at a time, without context
    takeover.  Inflating is not done here (Autobahn's call would be
    unbounded) but by the hop with an L{Inflater}.
    """

    EXTENSION_NAME = EXTENSION_NAME

    def __init__(self, agreement: DeflateAgreement) -> None:
        self.agreement = agreement
        #: The size of the next message to compress, when known.
        self.size_hint: int | None = None
        self._compress: zlib._Compress | None = None

    def __repr__(self) -> str:
        return self.agreement.response

    def __json__(self) -> dict[str, object]:
        # Autobahn's extensions report their parameters this way.
        return {"extension": EXTENSION_NAME, "response": self.agreement.response}

    # -- sending (Autobahn's beginMessage / sendMessage / endMessage) --

    def start_compress_message(self) -> None:
        bits = message_window_bits(self.size_hint, self.agreement.window_bits)
        self.size_hint = None
        self._compress = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, MEM_LEVEL
        )

    def compress_message_data(self, data: bytes) -> bytes:
        assert self._compress is not None
        return self._compress.compress(data)

    def end_compress_message(self) -> bytes:
        compress, self._compress = self._compress, None
        assert compress is not None
        out = compress.flush(zlib.Z_SYNC_FLUSH)
        # A sync flush always ends with the empty stored block, which the
        # sender strips (RFC 7692 section 7.2.1).
        return out[: -len(_TAIL)]

    # -- receiving: the hop inflates; Autobahn's calls are no-ops ----------

    def start_decompress_message(self) -> None:
        pass

    def decompress_message_data(self, data: bytes, max_output_len: int | None = None) -> bytes:
        raise AssertionError("the client hop inflates compressed messages itself")

    def end_decompress_message(self) -> None:
        pass


__all__ = [
    "DEFAULT_WINDOW_BITS",
    "EXTENSION_NAME",
    "INFLATE_CHUNK",
    "Deflate",
    "DeflateAgreement",
    "Inflater",
    "accept_offer",
    "message_window_bits",
    "negotiate",
]
