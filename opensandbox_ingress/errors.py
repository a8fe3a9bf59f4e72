"""
The one error hierarchy of the ingress.

Every response that the ingress generates itself (as opposed to relaying a
backend's) comes from an L{IngressError}: it carries the HTTP status, a
stable machine-readable code (sent as C{OpenSandbox-Ingress-Error}) and a
human-readable reason (sent as the C{text/plain} body
C{OpenSandbox Ingress: <reason>}).  Resources never write status literals;
they raise or return one of these and L{opensandbox_ingress.web.errors}
renders it.
"""

from __future__ import annotations

from typing import ClassVar

ERROR_HEADER = b"OpenSandbox-Ingress-Error"
BODY_PREFIX = "OpenSandbox Ingress: "


class IngressError(Exception):
    """
    A failure with an HTTP status and a stable code.

    Subclasses fix C{status} and C{code}; instances carry the reason.
    """

    status: ClassVar[int] = 502
    code: ClassVar[str] = "ingress_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"

    def body(self) -> bytes:
        """The C{text/plain} body sent to the client."""
        return (BODY_PREFIX + self.reason + "\n").encode("utf-8")

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers besides the error code (for example C{Retry-After})."""
        return []


class RouteInvalid(IngressError):
    """The request carries no usable route (400)."""

    status = 400
    code = "route_invalid"


class SandboxNotFound(IngressError):
    """No sandbox of that id is known (404)."""

    status = 404
    code = "sandbox_not_found"


class SandboxNotReady(IngressError):
    """The sandbox exists but has no usable endpoint yet (503)."""

    status = 503
    code = "sandbox_not_ready"

    def __init__(self, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"Retry-After", str(self.retry_after).encode("ascii"))]


class SandboxAmbiguous(IngressError):
    """The id names sandboxes in more than one namespace (502)."""

    status = 502
    code = "sandbox_ambiguous"


class RegistryNotSynced(IngressError):
    """The sandbox source has not delivered its first snapshot yet (503)."""

    status = 503
    code = "registry_not_synced"


class ProviderError(IngressError):
    """The sandbox source failed in a way that is not about one sandbox (502)."""

    status = 502
    code = "provider_error"


class Unauthorized(IngressError):
    """Secure access denied: missing or wrong credential (401)."""

    status = 401
    code = "unauthorized"


class AccessExpired(IngressError):
    """A signed route whose expiry has passed (401)."""

    status = 401
    code = "access_expired"


class SignatureInvalid(IngressError):
    """A signed route whose expires or signature segment is malformed (400)."""

    status = 400
    code = "signature_invalid"


class VerifierNotConfigured(IngressError):
    """A signed route reached an ingress without verification keys (503)."""

    status = 503
    code = "verifier_not_configured"


class UpstreamUnreachable(IngressError):
    """The backend could not be connected to, or failed before answering (502)."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(IngressError):
    """The backend did not connect or answer within the configured time (502)."""

    status = 502
    code = "upstream_timeout"


class UpstreamInvalidResponse(IngressError):
    """
    The backend's response head is not one the ingress relays: a status
    outside 100..599, a malformed status line or framing, a header name
    that is not a token, or a control byte in a header value (502).
    """

    status = 502
    code = "upstream_invalid_response"


class RequestInvalid(IngressError):
    """The request's framing is refused (400): see README, "HTTP framing"."""

    status = 400
    code = "request_invalid"


class RequestHeadTooLarge(IngressError):
    """The request head is over C{--max-header-bytes} or 100 fields (431)."""

    status = 431
    code = "request_header_too_large"


class NotImplementedByIngress(IngressError):
    """C{CONNECT}, an unknown method or transfer coding (501)."""

    status = 501
    code = "not_implemented"


class VersionNotSupported(IngressError):
    """An HTTP version other than 1.0 and 1.1 (505)."""

    status = 505
    code = "http_version_not_supported"


_FRAMING_ERRORS: dict[int, type[IngressError]] = {
    400: RequestInvalid,
    431: RequestHeadTooLarge,
    501: NotImplementedByIngress,
    505: VersionNotSupported,
}


def framing_error(status: int, reason: str) -> IngressError:
    """The L{IngressError} for a request the framing policy refused with C{status}."""
    return _FRAMING_ERRORS.get(status, RequestInvalid)(reason)


class ClientTimeout(IngressError):
    """
    The client stopped sending its request body for the idle timeout while
    the backend waited for it (408): the client's fault, not the sandbox's.
    """

    status = 408
    code = "client_timeout"


class WebSocketUpstreamUnreachable(IngressError):
    """The backend WebSocket could not be reached (503, as upstream does)."""

    status = 503
    code = "upstream_unreachable"


class ShuttingDown(IngressError):
    """The ingress is draining and takes no new work (503)."""

    status = 503
    code = "shutting_down"


class WebSocketHandshakeInvalid(IngressError):
    """The client's upgrade request is not a valid WebSocket handshake (400)."""

    status = 400
    code = "websocket_handshake_invalid"

    def __init__(self, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self._headers = headers

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._headers)


class WebSocketUpstreamRefused(IngressError):
    """
    The backend answered the upgrade with something other than 101.  The
    client gets the backend's status when it is an error or a redirect,
    502 otherwise (a 2xx answer to an upgrade is not a WebSocket endpoint).
    """

    status = 502
    code = "upstream_refused"

    def __init__(
        self, reason: str, status: int, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(reason)
        # The status is the backend's, so it varies per instance.
        self.status = status if 300 <= status <= 599 else 502  # type: ignore[misc]
        self._headers = headers

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._headers)
