"""
OSEP-0011 secure access: signed routes and access tokens.

Pure functions of their inputs; no reactor, no I/O.  The decision order is
L{check_access}; the formats (base-36 expiry, 9-character signature) are
validated by L{is_expires_b36} and L{is_signature}, which the route parser
also uses to recognise the signed grammar.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ._compat import DATACLASS_SLOTS
from .errors import (
    AccessExpired,
    SignatureInvalid,
    Unauthorized,
    VerifierNotConfigured,
)

#: Header carrying the sandbox's access token directly.
SECURE_ACCESS_HEADER = b"OpenSandbox-Secure-Access"

_B36_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_EXPIRES_RE = re.compile(r"0|[1-9a-z][0-9a-z]{0,12}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{8}[0-9a-z]")
_UINT64_MAX = 2**64 - 1


@dataclass(frozen=True, **DATACLASS_SLOTS)
class SignedPart:
    """The signed segments of a route, as they appeared in it."""

    expires_b36: str
    signature: str


def is_expires_b36(text: str) -> bool:
    """
    Whether C{text} is a well-formed expiry: lowercase base 36, 1..13
    characters, no leading zero (except C{"0"}), fitting in a uint64.
    """
    return _EXPIRES_RE.fullmatch(text) is not None and int(text, 36) <= _UINT64_MAX


def is_signature(text: str) -> bool:
    """Whether C{text} is 8 lowercase hex digits followed by a key id."""
    return _SIGNATURE_RE.fullmatch(text) is not None


def encode_b36(value: int) -> str:
    """Encode a non-negative integer (at most uint64) in lowercase base 36."""
    if not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{value} is outside 0..2**64-1")
    if value == 0:
        return "0"
    digits = []
    while value:
        value, rem = divmod(value, 36)
        digits.append(_B36_DIGITS[rem])
    return "".join(reversed(digits))


def decode_b36(text: str) -> int:
    """Decode a well-formed expiry; raise C{ValueError} otherwise."""
    if not is_expires_b36(text):
        raise ValueError(f"{text!r} is not a valid base-36 expiry")
    return int(text, 36)


def canonical_bytes(sandbox_id: str, port: int, expires_b36: str) -> bytes:
    """The canonical string that a signature covers (UTF-8)."""
    return f"v1\nshort\n{sandbox_id}\n{port}\n{expires_b36}\n".encode()


def signature_hex8(secret: bytes, sandbox_id: str, port: int, expires_b36: str) -> str:
    """
    The 8 hex digits of a signature:
    C{hex(sha256(BE32(len(secret)) + secret + BE32(len(c)) + c))[:8]}.
    """
    canonical = canonical_bytes(sandbox_id, port, expires_b36)
    inner = (
        struct.pack(">I", len(secret))
        + secret
        + struct.pack(">I", len(canonical))
        + canonical
    )
    return hashlib.sha256(inner).hexdigest()[:8]


def sign(
    secret: bytes, key_id: str, sandbox_id: str, port: int, expires: int
) -> SignedPart:
    """Mint the signed segments for a route (for operators and tests)."""
    expires_b36 = encode_b36(expires)
    return SignedPart(
        expires_b36, signature_hex8(secret, sandbox_id, port, expires_b36) + key_id
    )


def signed_host_token(
    secret: bytes, key_id: str, sandbox_id: str, port: int, expires: int
) -> str:
    """The header/host routing token C{{id}-{port}-{expires}-{signature}}."""
    part = sign(secret, key_id, sandbox_id, port, expires)
    return f"{sandbox_id}-{port}-{part.expires_b36}-{part.signature}"


def verify_signed_route(
    keys: Mapping[str, bytes],
    sandbox_id: str,
    port: int,
    signed: SignedPart,
    now: float,
) -> None:
    """
    Verify a signed route; return on success.

    @raise VerifierNotConfigured: no keys are configured.
    @raise SignatureInvalid: the expires or signature segment is malformed.
    @raise AccessExpired: C{now} is past the expiry second (a route stays
        valid until that second ends: upstream compares whole Unix seconds).
    @raise Unauthorized: unknown key id or wrong signature.
    """
    if not keys:
        raise VerifierNotConfigured(
            "signed route received but no secure-access keys are configured"
        )
    if not is_expires_b36(signed.expires_b36):
        raise SignatureInvalid("malformed expires segment in signed route")
    if not is_signature(signed.signature):
        raise SignatureInvalid("malformed signature segment in signed route")
    # Whole seconds, as upstream's time.Now().Unix() > expires: a float
    # comparison would expire a route up to a second early.
    if math.floor(now) > int(signed.expires_b36, 36):
        raise AccessExpired("signed route has expired")
    key_id = signed.signature[8]
    secret = keys.get(key_id)
    if secret is None:
        raise Unauthorized("signed route uses an unknown key id")
    expected = signature_hex8(secret, sandbox_id, port, signed.expires_b36)
    if not hmac.compare_digest(expected, signed.signature[:8]):
        raise Unauthorized("signed route signature does not match")


def check_access(
    required_token: str | None,
    header_values: Sequence[bytes] | None,
    keys: Mapping[str, bytes],
    sandbox_id: str,
    port: int,
    signed: SignedPart | None,
    now: float,
) -> None:
    """
    The OSEP-0011 decision for one request; return when access is allowed.

    1. Sandboxes without a token need nothing.
    2. A present C{OpenSandbox-Secure-Access} header (even empty) decides
       alone: its trimmed first value must equal the token (constant time).
    3. Otherwise a signed route must verify (L{verify_signed_route}).
    4. Otherwise L{Unauthorized}.
    """
    if not required_token:
        return
    if header_values is not None:
        given = header_values[0].strip() if header_values else b""
        if hmac.compare_digest(given, required_token.encode("utf-8")):
            return
        raise Unauthorized("secure access token does not match")
    if signed is not None:
        verify_signed_route(keys, sandbox_id, port, signed, now)
        return
    raise Unauthorized("sandbox requires secure access")


class KeyRing(Mapping[str, bytes]):
    """
    The live OSEP-0011 verification keys (key id -> secret).

    A mapping whose contents are replaced whole by L{replace} (the keys
    file watcher, on the reactor thread), so holders of the ring see a
    rotation at once without being rebuilt.  Its C{repr} shows the key ids,
    never the secrets.
    """

    def __init__(self, keys: Iterable[tuple[str, bytes]] = ()) -> None:
        self._keys: dict[str, bytes] = dict(keys)

    def replace(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Make C{keys} the whole key set (reactor thread)."""
        self._keys = dict(keys)

    def __getitem__(self, key_id: str) -> bytes:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<KeyRing ids={sorted(self._keys)}>"
