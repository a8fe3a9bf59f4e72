"""OSEP-0011 secure access (SPEC section 3): formats, signatures, decisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opensandbox_ingress.errors import (
    AccessExpired,
    IngressError,
    SignatureInvalid,
    Unauthorized,
    VerifierNotConfigured,
)
from opensandbox_ingress.secure_access import (
    SignedPart,
    canonical_bytes,
    check_access,
    decode_b36,
    encode_b36,
    is_expires_b36,
    is_signature,
    sign,
    signature_hex8,
    signed_host_token,
    verify_signed_route,
)

UINT64_MAX = 2**64 - 1
KEYS = {"a": b"k"}
EXAMPLE = SignedPart("x2qxvk", "614adedea")
EXPIRES = 2_000_000_000
NOW = 1_700_000_000.0

# -- the worked example ----------------------------------------------------------


def test_worked_example() -> None:
    """SPEC 3's worked example: x2qxvk, 614adedea, sb-8080-x2qxvk-614adedea."""
    assert encode_b36(EXPIRES) == "x2qxvk"
    assert canonical_bytes("sb", 8080, "x2qxvk") == b"v1\nshort\nsb\n8080\nx2qxvk\n"
    assert signature_hex8(b"k", "sb", 8080, "x2qxvk") == "614adede"
    assert sign(b"k", "a", "sb", 8080, EXPIRES) == EXAMPLE
    assert signed_host_token(b"k", "a", "sb", 8080, EXPIRES) == "sb-8080-x2qxvk-614adedea"


def test_worked_example_verifies() -> None:
    """The worked example's signature verifies under key a before expiry."""
    verify_signed_route(KEYS, "sb", 8080, EXAMPLE, NOW)


def test_canonical_is_utf8() -> None:
    """The canonical string is UTF-8 encoded."""
    assert canonical_bytes("é", 1, "0") == "v1\nshort\né\n1\n0\n".encode()


# -- formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("0", True),
        ("1", True),
        ("x2qxvk", True),
        ("z" * 12, True),
        ("3w5e11264sgsf", True),  # 2**64 - 1
        ("3w5e11264sgsg", False),  # 2**64
        ("zzzzzzzzzzzzz", False),  # 13 chars but above uint64
        ("1" + "0" * 13, False),  # 14 chars
        ("", False),
        ("00", False),
        ("0x2qxvk", False),
        ("X2QXVK", False),
        ("x2qXvk", False),
        ("-1", False),
        ("x2q-vk", False),
        ("x2qxvk\n", False),
        (" x2qxvk", False),
        ("１", False),
        ("é", False),
    ],
)
def test_is_expires_b36(text: str, valid: bool) -> None:
    """Expires is lowercase base 36, 1..13 chars, no leading zero but '0', <= uint64."""
    assert is_expires_b36(text) is valid


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("614adedea", True),
        ("000000000", True),
        ("ffffffffz", True),
        ("614adede9", True),
        ("614ADEDEa", False),
        ("614adedeA", False),
        ("614adedg1", False),
        ("614adede", False),
        ("614adedeaa", False),
        ("614adede-", False),
        ("", False),
        ("614adedea\n", False),
    ],
)
def test_is_signature(text: str, valid: bool) -> None:
    """A signature is 8 lowercase hex digits and a key id of [0-9a-z]."""
    assert is_signature(text) is valid


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (35, "z"), (36, "10"), (EXPIRES, "x2qxvk"), (UINT64_MAX, "3w5e11264sgsf")],
)
def test_encode_decode_b36_table(value: int, text: str) -> None:
    """Known values encode to lowercase base 36 and decode back."""
    assert encode_b36(value) == text
    assert decode_b36(text) == value


@pytest.mark.parametrize("value", [-1, 2**64, 2**100])
def test_encode_b36_rejects_out_of_range(value: int) -> None:
    """Values outside 0..2**64-1 cannot be encoded."""
    with pytest.raises(ValueError):
        encode_b36(value)


@pytest.mark.parametrize("text", ["", "00", "01", "A", "3w5e11264sgsg", "z" * 14])
def test_decode_b36_rejects_malformed(text: str) -> None:
    """Malformed expiries do not decode."""
    with pytest.raises(ValueError):
        decode_b36(text)


@given(st.integers(min_value=0, max_value=UINT64_MAX))
def test_b36_round_trip(value: int) -> None:
    """Every uint64 encodes to a valid expiry that decodes back to itself."""
    text = encode_b36(value)
    assert is_expires_b36(text)
    assert 1 <= len(text) <= 13
    assert decode_b36(text) == value


@given(
    secret=st.binary(min_size=1, max_size=64),
    key_id=st.sampled_from("0123456789abcdefghijklmnopqrstuvwxyz"),
    sandbox_id=st.text(min_size=1, max_size=30),
    port=st.integers(min_value=1, max_value=65535),
    expires=st.integers(min_value=0, max_value=UINT64_MAX),
)
def test_sign_then_verify(
    secret: bytes, key_id: str, sandbox_id: str, port: int, expires: int
) -> None:
    """Whatever is signed is well-formed and verifies with the same key before expiry."""
    part = sign(secret, key_id, sandbox_id, port, expires)
    assert is_expires_b36(part.expires_b36)
    assert is_signature(part.signature)
    assert part.signature[8] == key_id
    verify_signed_route({key_id: secret}, sandbox_id, port, part, now=expires)


# -- verify_signed_route ---------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "sandbox_id", "port", "signed", "now", "error"),
    [
        ({}, "sb", 8080, EXAMPLE, NOW, VerifierNotConfigured),
        (KEYS, "sb", 8080, SignedPart("0x2qxvk", "614adedea"), NOW, SignatureInvalid),
        (KEYS, "sb", 8080, SignedPart("X2QXVK", "614adedea"), NOW, SignatureInvalid),
        (KEYS, "sb", 8080, SignedPart("x2qxvk", "614adede"), NOW, SignatureInvalid),
        (KEYS, "sb", 8080, SignedPart("x2qxvk", "614ADEDEa"), NOW, SignatureInvalid),
        (KEYS, "sb", 8080, EXAMPLE, EXPIRES + 1, AccessExpired),
        (KEYS, "sb", 8080, EXAMPLE, EXPIRES + 1.5, AccessExpired),
        (KEYS, "sb", 8080, SignedPart("x2qxvk", "614adedeb"), NOW, Unauthorized),
        ({"b": b"k"}, "sb", 8080, EXAMPLE, NOW, Unauthorized),
        ({"a": b"other"}, "sb", 8080, EXAMPLE, NOW, Unauthorized),
        (KEYS, "sb", 8080, SignedPart("x2qxvk", "714adedea"), NOW, Unauthorized),
        (KEYS, "sc", 8080, EXAMPLE, NOW, Unauthorized),
        (KEYS, "sb", 8081, EXAMPLE, NOW, Unauthorized),
        (KEYS, "sb", 8080, SignedPart("x2qxvl", "614adedea"), NOW, Unauthorized),
    ],
)
def test_verify_signed_route_rejects(
    keys: dict[str, bytes],
    sandbox_id: str,
    port: int,
    signed: SignedPart,
    now: float,
    error: type[IngressError],
) -> None:
    """No keys 503, malformed 400, expired 401, unknown key or wrong signature 401."""
    with pytest.raises(error) as e:
        verify_signed_route(keys, sandbox_id, port, signed, now)
    assert type(e.value) is error


def test_verify_signed_route_expiry_is_inclusive() -> None:
    """A route is still valid throughout its expiry second, and expired after it."""
    verify_signed_route(KEYS, "sb", 8080, EXAMPLE, float(EXPIRES))
    verify_signed_route(KEYS, "sb", 8080, EXAMPLE, EXPIRES + 0.999)
    with pytest.raises(AccessExpired):
        verify_signed_route(KEYS, "sb", 8080, EXAMPLE, EXPIRES + 1.0)


def test_key_rotation() -> None:
    """With several keys, each signature verifies under the key its id names."""
    keys = {"a": b"old-secret", "b": b"new-secret", "0": b"third"}
    for key_id, secret in keys.items():
        part = sign(secret, key_id, "sb", 80, EXPIRES)
        verify_signed_route(keys, "sb", 80, part, NOW)
        # The same hex under another key id is refused.
        for other in keys.keys() - {key_id}:
            forged = SignedPart(part.expires_b36, part.signature[:8] + other)
            with pytest.raises(Unauthorized):
                verify_signed_route(keys, "sb", 80, forged, NOW)


# -- check_access decision table -------------------------------------------------

_ALLOW = None


@pytest.mark.parametrize(
    ("token", "header", "keys", "signed", "now", "outcome"),
    [
        # 1. No token: nothing required, whatever is sent.
        (None, None, {}, None, NOW, _ALLOW),
        ("", None, {}, None, NOW, _ALLOW),
        (None, [b"wrong"], {}, SignedPart("00", "zzz"), NOW, _ALLOW),
        # 2. Header present: it alone decides.
        ("tok", [b"tok"], {}, None, NOW, _ALLOW),
        ("tok", [b"  tok \t"], {}, None, NOW, _ALLOW),
        ("tok", [b"tok", b"other"], {}, None, NOW, _ALLOW),
        ("tok", [b"other", b"tok"], KEYS, None, NOW, Unauthorized),
        ("tok", [b""], KEYS, EXAMPLE, NOW, Unauthorized),
        ("tok", [], KEYS, EXAMPLE, NOW, Unauthorized),
        ("tok", [b"wrong"], KEYS, EXAMPLE, NOW, Unauthorized),
        ("tok", [b"TOK"], KEYS, EXAMPLE, NOW, Unauthorized),
        ("tok", [b"to"], {}, None, NOW, Unauthorized),
        ("tok", [b"tok\xff"], {}, None, NOW, Unauthorized),
        # 3. No header: a signed route.
        ("tok", None, KEYS, EXAMPLE, NOW, _ALLOW),
        ("tok", None, {}, EXAMPLE, NOW, VerifierNotConfigured),
        ("tok", None, KEYS, SignedPart("0x2qxvk", "614adedea"), NOW, SignatureInvalid),
        ("tok", None, KEYS, SignedPart("x2qxvk", "614adede"), NOW, SignatureInvalid),
        ("tok", None, KEYS, EXAMPLE, EXPIRES + 1, AccessExpired),
        ("tok", None, {"b": b"k"}, EXAMPLE, NOW, Unauthorized),
        ("tok", None, {"a": b"x"}, EXAMPLE, NOW, Unauthorized),
        # 4. Nothing.
        ("tok", None, KEYS, None, NOW, Unauthorized),
        ("tok", None, {}, None, NOW, Unauthorized),
    ],
)
def test_check_access(
    token: str | None,
    header: list[bytes] | None,
    keys: dict[str, bytes],
    signed: SignedPart | None,
    now: float,
    outcome: type[IngressError] | None,
) -> None:
    """The OSEP-0011 decision order: no token, header alone, signed route, refuse."""
    if outcome is None:
        check_access(token, header, keys, "sb", 8080, signed, now)
        return
    with pytest.raises(outcome) as e:
        check_access(token, header, keys, "sb", 8080, signed, now)
    assert type(e.value) is outcome


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unauthorized, 401),
        (AccessExpired, 401),
        (SignatureInvalid, 400),
        (VerifierNotConfigured, 503),
    ],
)
def test_error_statuses(error: type[IngressError], status: int) -> None:
    """Each secure-access failure carries the status SPEC 3 gives it."""
    assert error.status == status


def test_check_access_non_ascii_token() -> None:
    """A token with non-ASCII characters compares by its UTF-8 bytes."""
    check_access("tök", ["tök".encode()], {}, "sb", 1, None, NOW)
    with pytest.raises(Unauthorized):
        check_access("tök", [b"tok"], {}, "sb", 1, None, NOW)
