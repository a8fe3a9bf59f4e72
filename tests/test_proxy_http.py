"""End-to-end HTTP proxying through real loopback sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from opensandbox_ingress import IngressService
from opensandbox_ingress.registry import SandboxRecord
from tests.backend import Backend, RawBackend
from tests.helpers import (
    FRONT_ENDS,
    header,
    ingress_port,
    ingress_url,
    raw_connect,
    request,
    start_front_end,
    start_ingress,
    stop_front_end,
    wait_until,
    write_sandboxes,
)

SANDBOXES: list[dict[str, Any]] = [
    {"name": "sbx", "endpoint": "127.0.0.1"},
    {"name": "my-sandbox", "endpoint": "127.0.0.1"},
    {"name": "other", "endpoint": "127.0.0.1"},
    {"name": "starting", "endpoint": "127.0.0.1", "ready": False},
    {"name": "private", "endpoint": "127.0.0.1", "secure_access_token": "tok-1"},
]


@pytest.fixture(params=FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> str:
    """Each behaviour test runs through the proxy listener and an embedder's Site."""
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path, front_end: str) -> AsyncIterator[IngressService]:
    service = await start_front_end(tmp_path, SANDBOXES, front_end)
    yield service
    await stop_front_end(service)


@pytest_twisted.async_yield_fixture
async def streaming(tmp_path: Path) -> AsyncIterator[IngressService]:
    """
    The proxy listener only: uploads stream through its own request
    handling; a plain Site buffers a body before rendering (README
    "Embedding").
    """
    service = await start_ingress(tmp_path, SANDBOXES)
    yield service
    await service.stopService()


@pytest_twisted.async_yield_fixture
async def uri_ingress(tmp_path: Path, front_end: str) -> AsyncIterator[IngressService]:
    service = await start_front_end(tmp_path, SANDBOXES, front_end, mode="uri")
    yield service
    await stop_front_end(service)


def seen_headers(seen: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# -- routing ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"OpenSandbox-Ingress-To": "sbx-{p}"}, "sbx"),
        ({"OPEN-SANDBOX-INGRESS": "my-sandbox-{p}"}, "my-sandbox"),
        ({"Host": "other-{p}.sandboxes.example.com"}, "other"),
        ({"OpenSandbox-Ingress-To": "sbx-{p}", "OPEN-SANDBOX-INGRESS": "other-{p}"}, "sbx"),
        ({"OPEN-SANDBOX-INGRESS": "sbx-{p}", "Host": "other-{p}.example.com"}, "sbx"),
        ({"OpenSandbox-Ingress-To": "", "Host": "other-{p}.example.com"}, "other"),
        ({"OpenSandbox-Ingress-To": "https://sbx-{p}.example.com"}, "sbx"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_header_mode_routing_precedence(
    ingress: IngressService, backend: Backend, headers: dict[str, str], expected: str
) -> None:
    """The first non-empty of Ingress-To, the legacy header and Host picks the sandbox."""
    port = backend.port_number
    # Each sandbox id resolves to the same backend; the sandbox is named in
    # the access log, which we read here.
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response, body = await request(
            "GET",
            ingress_url(ingress, "/echo/x?q=1"),
            headers={k: v.format(p=port) for k, v in headers.items()},
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 200, body
    assert json.loads(body)["uri"] == "/echo/x?q=1"
    access = [e for e in events if e.get("log_namespace") == "opensandbox_ingress.access"]
    assert [e["sandbox"] for e in access] == [expected]


@pytest_twisted.ensureDeferred
async def test_uri_mode_strips_prefix(uri_ingress: IngressService, backend: Backend) -> None:
    """/{id}/{port}/{rest}?q reaches the backend as /{rest}?q with X-Forwarded-Prefix."""
    port = backend.port_number
    response, body = await request(
        "GET", ingress_url(uri_ingress, f"/sbx/{port}/echo/deep/path?a=1&b=%2F")
    )
    assert response.code == 200, body
    seen = json.loads(body)
    assert seen["uri"] == "/echo/deep/path?a=1&b=%2F"
    assert seen_headers(seen)["x-forwarded-prefix"] == [f"/sbx/{port}"]


@pytest_twisted.ensureDeferred
async def test_uri_mode_bare_route_forwards_root(
    uri_ingress: IngressService, backend: Backend
) -> None:
    """/{id}/{port} with no rest reaches the backend as /."""
    response, body = await request(
        "GET", ingress_url(uri_ingress, f"/sbx/{backend.port_number}?x=1")
    )
    assert response.code == 200
    assert json.loads(body)["uri"] == "/?x=1"


@pytest.mark.parametrize(
    "location, expected",
    [
        ("/login", "/sbx/{p}/login"),
        ("//cdn.example.com/x", "//cdn.example.com/x"),
        ("https://example.com/x", "https://example.com/x"),
        ("relative/x", "relative/x"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_uri_mode_rebases_root_relative_location(
    uri_ingress: IngressService, backend: Backend, location: str, expected: str
) -> None:
    """A root-relative redirect stays inside the sandbox prefix; others are untouched."""
    port = backend.port_number
    response, _ = await request(
        "GET", ingress_url(uri_ingress, f"/sbx/{port}/redirect?to={location}")
    )
    assert response.code == 302
    assert header(response, "Location") == expected.format(p=port)


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({"OpenSandbox-Ingress-To": "sbx-notaport"}, 400, "route_invalid"),
        ({"OpenSandbox-Ingress-To": "sbx-0"}, 400, "route_invalid"),
        ({"OpenSandbox-Ingress-To": "sbx-65536"}, 400, "route_invalid"),
        ({"OpenSandbox-Ingress-To": "-8080"}, 400, "route_invalid"),
        ({"Host": "localhost"}, 400, "route_invalid"),
        ({"OpenSandbox-Ingress-To": "missing-8080"}, 404, "sandbox_not_found"),
        ({"OpenSandbox-Ingress-To": "starting-8080"}, 503, "sandbox_not_ready"),
        ({"OpenSandbox-Ingress-To": "private-8080"}, 401, "unauthorized"),
        (
            {"OpenSandbox-Ingress-To": "private-8080", "OpenSandbox-Secure-Access": "wrong"},
            401,
            "unauthorized",
        ),
        ({"OpenSandbox-Ingress-To": "private-8080-x2qxvk-614adedea"}, 503, "verifier_not_configured"),
        ({"OpenSandbox-Ingress-To": "sbx-9"}, 502, "upstream_unreachable"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_statuses_and_codes(
    ingress: IngressService, headers: dict[str, str], status: int, code: str
) -> None:
    """Each failure answers its documented status, error-code header and text body."""
    response, body = await request("GET", ingress_url(ingress, "/x"), headers=headers)
    assert response.code == status
    assert header(response, "OpenSandbox-Ingress-Error") == code
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert body.startswith(b"OpenSandbox Ingress: ")
    assert header(response, "Server") is None


@pytest_twisted.ensureDeferred
async def test_ambiguous_name_is_502(ingress: IngressService) -> None:
    """A name in two namespaces answers 502 sandbox_ambiguous naming both."""
    ingress.registry.upsert(SandboxRecord("twin", "ns-a", "127.0.0.1", generation="a"))
    ingress.registry.upsert(SandboxRecord("twin", "ns-b", "127.0.0.1", generation="b"))
    response, body = await request(
        "GET", ingress_url(ingress), headers={"OpenSandbox-Ingress-To": "twin-80"}
    )
    assert response.code == 502
    assert header(response, "OpenSandbox-Ingress-Error") == "sandbox_ambiguous"
    assert b"ns-a" in body and b"ns-b" in body


@pytest_twisted.ensureDeferred
async def test_secure_access_header_allows_and_is_stripped(
    ingress: IngressService, backend: Backend
) -> None:
    """The right access token passes and never reaches the backend."""
    response, body = await request(
        "GET",
        ingress_url(ingress, "/echo"),
        headers={
            "OpenSandbox-Ingress-To": f"private-{backend.port_number}",
            "OpenSandbox-Secure-Access": " tok-1 ",
        },
    )
    assert response.code == 200
    assert "opensandbox-secure-access" not in seen_headers(json.loads(body))


@pytest_twisted.ensureDeferred
async def test_upstream_idle_timeout_answers_502_timeout(tmp_path: Path, backend: Backend) -> None:
    """A backend that accepts but never answers gets upstream_timeout after the idle timeout."""
    service = await start_ingress(tmp_path, SANDBOXES, idle_timeout_s=0.3)
    try:
        response, _ = await request(
            "GET",
            ingress_url(service, "/hang"),
            headers={"OpenSandbox-Ingress-To": f"sbx-{backend.port_number}"},
        )
        assert response.code == 502
        assert header(response, "OpenSandbox-Ingress-Error") == "upstream_timeout"
        await wait_until(lambda: backend.hang_lost, what="backend request cancelled")
    finally:
        await service.stopService()


# -- header rewriting ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_headers_rewritten(ingress: IngressService, backend: Backend) -> None:
    """Host, X-Forwarded-*, hop-by-hop and routing headers are rewritten as SPEC 7 says."""
    port = backend.port_number
    response, body = await request(
        "POST",
        ingress_url(ingress, "/echo"),
        headers={
            "OpenSandbox-Ingress-To": f"sbx-{port}",
            "OPEN-SANDBOX-INGRESS": "ignored-1",
            "Host": "sbx-front.example.com",
            "X-Forwarded-For": "203.0.113.7",
            "Connection": "keep-alive, X-Hop-Private",
            "X-Hop-Private": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "Authorization": "Bearer end-to-end",
            "Cookie": "a=1",
        },
        data=b"payload",
    )
    assert response.code == 200
    seen = json.loads(body)
    got = seen_headers(seen)
    assert got["host"] == [f"127.0.0.1:{port}"]
    assert got["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert got["x-forwarded-proto"] == ["http"]
    assert got["x-forwarded-host"] == ["sbx-front.example.com"]
    assert got["authorization"] == ["Bearer end-to-end"]
    assert got["cookie"] == ["a=1"]
    for gone in (
        "opensandbox-ingress-to",
        "open-sandbox-ingress",
        "x-hop-private",
        "keep-alive",
        "proxy-authorization",
        "te",
    ):
        assert gone not in got, gone
    assert seen["body_len"] == 7


@pytest_twisted.ensureDeferred
async def test_response_headers_filtered(ingress: IngressService, backend: Backend) -> None:
    """Hop-by-hop response headers (and those named in Connection) do not reach the client."""
    response, body = await request(
        "GET",
        ingress_url(ingress, "/hop"),
        headers={"OpenSandbox-Ingress-To": f"sbx-{backend.port_number}"},
    )
    assert body == b"hop"
    assert header(response, "X-Kept") == "yes"
    assert header(response, "X-Secret-Hop") is None
    assert header(response, "Keep-Alive") is None
    assert header(response, "Proxy-Authenticate") is None
    assert header(response, "Reverse-Proxy-Server-PowerBy") == "OpenSandbox-ingress"


@pytest_twisted.ensureDeferred
async def test_no_content_type_invented_and_length_kept(
    ingress: IngressService, backend: Backend
) -> None:
    """A backend response without Content-Type gets none; Content-Length passes through."""
    client = await raw_connect(ingress_port(ingress))
    client.transport.write(
        b"GET /no-type HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n\r\n"
        % backend.port_number
    )
    await wait_until(lambda: client.received.endswith(b"raw"), what="response")
    head = bytes(client.received).split(b"\r\n\r\n")[0].lower()
    assert b"content-type" not in head
    assert b"content-length: 3" in head
    assert b"transfer-encoding" not in head
    client.transport.loseConnection()


# -- streaming ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_incrementally(ingress: IngressService, backend: Backend) -> None:
    """Each server-sent event reaches the client while the response is still open."""
    client = await raw_connect(ingress_port(ingress))
    arrived = backend.next_sse()
    client.transport.write(
        b"GET /sse HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n\r\n"
        % backend.port_number
    )
    sse = await arrived
    await wait_until(lambda: b"text/event-stream" in client.received, what="head")
    sse.write(b"data: one\n\n")
    await wait_until(lambda: b"data: one" in client.received, what="first event")
    assert b"data: two" not in client.received
    sse.write(b"data: two\n\n")
    await wait_until(lambda: b"data: two" in client.received, what="second event")
    sse.finish()
    await wait_until(lambda: client.received.endswith(b"0\r\n\r\n"), what="end of stream")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_backend(ingress: IngressService, backend: Backend) -> None:
    """A client that stops reading pauses the backend's writes; reading again finishes the body."""
    size = 256 * 1024 * 1024
    client = await raw_connect(ingress_port(ingress))
    client.transport.write(
        b"GET /download?size=%d HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n\r\n"
        % (size, backend.port_number)
    )
    await wait_until(lambda: len(client.received) > 0, what="first bytes")
    client.transport.pauseProducing()
    await wait_until(lambda: backend.pauses > 0, timeout=10, what="backend paused")
    written = backend.download_written
    # Give the pipeline a moment's worth of reactor turns: the backend stays
    # paused, so it cannot have written (nearly) the whole body.
    await wait_until(lambda: backend.download_written == written or True)
    assert backend.download_written < size / 4
    received = len(client.received)
    client.received = bytearray()
    client.transport.resumeProducing()
    total = [received]

    def drain() -> bool:
        total[0] += len(client.received)
        client.received.clear()
        return total[0] >= size

    await wait_until(drain, timeout=60, what="whole body")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_upload_reaches_backend_before_it_completes(streaming: IngressService) -> None:
    """The backend receives the first upload bytes while the client is still sending."""
    raw = RawBackend().listen()
    try:
        client = await raw_connect(ingress_port(streaming))
        client.transport.write(
            b"PUT /up HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
            b"Content-Length: 200000\r\n\r\n" % raw.port_number
        )
        client.transport.write(b"a" * 100000)
        await wait_until(lambda: raw.body_bytes >= 100000, what="first half at backend")
        assert raw.protocols[0].answered is False
        assert b"content-length: 200000" in raw.heads[0].lower()
        client.transport.write(b"b" * 100000)
        await wait_until(lambda: client.received.endswith(b"200000"), what="response")
        assert client.received.startswith(b"HTTP/1.1 200 OK")
        client.transport.loseConnection()
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_chunked_upload_is_streamed_chunked(streaming: IngressService) -> None:
    """A chunked upload reaches the backend chunked, as it arrives."""
    raw = RawBackend().listen()
    try:
        client = await raw_connect(ingress_port(streaming))
        client.transport.write(
            b"POST /up HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" % raw.port_number
        )
        await wait_until(lambda: raw.body_bytes > 0, what="first chunk at backend")
        assert b"transfer-encoding: chunked" in raw.heads[0].lower()
        client.transport.write(b"6\r\n world\r\n0\r\n\r\n")
        await wait_until(lambda: b"200 OK" in client.received, what="response")
        client.transport.loseConnection()
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_expect_continue_upload(ingress: IngressService, backend: Backend) -> None:
    """Expect: 100-continue gets a 100 and the upload then goes through."""
    client = await raw_connect(ingress_port(ingress))
    client.transport.write(
        b"POST /echo HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n" % backend.port_number
    )
    await wait_until(lambda: b"100 Continue" in client.received, what="100 Continue")
    client.transport.write(b"data")
    await wait_until(lambda: b'"body_len": 4' in client.received, what="echo")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_early_response_during_upload_closes_cleanly(streaming: IngressService) -> None:
    """A backend that answers before the upload ends: the client gets the answer, then close."""
    raw = RawBackend(early=True).listen()
    try:
        client = await raw_connect(ingress_port(streaming))
        client.transport.write(
            b"PUT /up HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
            b"Content-Length: 1000000\r\n\r\n" % raw.port_number + b"z" * 1000
        )
        await wait_until(lambda: b"200 OK" in client.received, what="early response")
        await wait_until(lambda: client.lost, what="connection closed")
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_backend_dying_mid_response_closes_client(
    ingress: IngressService, backend: Backend
) -> None:
    """A backend that stops mid-body leaves the client with a closed, truncated response."""
    client = await raw_connect(ingress_port(ingress))
    client.transport.write(
        b"GET /close-mid HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n\r\n"
        % backend.port_number
    )
    await client.closed
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower()
    assert body == b"0123456789"


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_backend_request(
    ingress: IngressService, backend: Backend
) -> None:
    """A client that goes away while waiting makes the ingress drop the backend request."""
    client = await raw_connect(ingress_port(ingress))
    client.transport.write(
        b"GET /hang HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n\r\n"
        % backend.port_number
    )
    await wait_until(lambda: backend.hanging, what="backend got the request")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.transport.loseConnection()
        await wait_until(lambda: backend.hang_lost, what="backend connection dropped")
        await wait_until(lambda: ingress.core.active_requests == 0, what="exchange finished")
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [e for e in events if e.get("log_namespace") == "opensandbox_ingress.access"]
    assert [e["status"] for e in access] == [499]


@pytest_twisted.ensureDeferred
async def test_slow_headers_are_dropped(tmp_path: Path) -> None:
    """A client that dribbles its headers is disconnected after the header timeout."""
    service = await start_ingress(tmp_path, SANDBOXES, header_timeout_s=0.3)
    try:
        client = await raw_connect(service.addresses()[0].port)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: sbx-80\r\n")
        await wait_until(lambda: client.lost, timeout=5, what="connection dropped")
        assert client.received == b""
    finally:
        await service.stopService()


# -- connection reuse ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_recycled_address_gets_new_connection(tmp_path: Path, backend: Backend) -> None:
    """After a sandbox is replaced by another at the same address, its pooled socket is not reused."""
    service = await start_ingress(tmp_path, [{"name": "old", "endpoint": "127.0.0.1"}])
    try:
        port = backend.port_number
        for _ in range(2):
            response, body = await request(
                "GET", ingress_url(service, "/echo"), headers={"OpenSandbox-Ingress-To": f"old-{port}"}
            )
            assert response.code == 200
        # Two requests, one pooled upstream connection.
        assert backend.connections == 1
        first_peer = json.loads(body)["peer_port"]
        write_sandboxes(tmp_path / "sandboxes.json", [{"name": "new", "endpoint": "127.0.0.1"}])
        await wait_until(
            lambda: [r.name for r in service.registry.records()] == ["new"], what="reload"
        )
        await wait_until(lambda: service.upstream.idle_connection_count() == 0)
        response, body = await request(
            "GET", ingress_url(service, "/echo"), headers={"OpenSandbox-Ingress-To": f"new-{port}"}
        )
        assert response.code == 200
        assert backend.connections == 2
        assert json.loads(body)["peer_port"] != first_peer
    finally:
        await service.stopService()


# -- file provider, health, embedding -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_reload_and_broken_file(tmp_path: Path, backend: Backend) -> None:
    """A changed file is picked up; a broken one keeps the last good state."""
    service = await start_ingress(tmp_path, [{"name": "a", "endpoint": "127.0.0.1"}])
    try:
        port = backend.port_number
        path = tmp_path / "sandboxes.json"
        path.write_text("[{not json")
        await wait_until(lambda: service.source.failures > 0, what="broken file seen")
        response, _ = await request(
            "GET", ingress_url(service, "/echo"), headers={"OpenSandbox-Ingress-To": f"a-{port}"}
        )
        assert response.code == 200
        write_sandboxes(path, [{"name": "b", "endpoint": "127.0.0.1"}])
        await wait_until(lambda: service.source.loads == 2, what="reload")
        response, _ = await request(
            "GET", ingress_url(service, "/echo"), headers={"OpenSandbox-Ingress-To": f"a-{port}"}
        )
        assert response.code == 404
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_health_before_and_after_sync(tmp_path: Path) -> None:
    """/status.ok is 503 until the sandboxes file has loaded, then 200 OK."""
    from twisted.internet import reactor

    from opensandbox_ingress import IngressConfig, build_ingress

    path = tmp_path / "later.json"
    service = build_ingress(
        IngressConfig(
            provider_type="file",
            sandboxes_file=str(path),
            listen=("tcp:0:interface=127.0.0.1",),
        ),
        reactor,
    )
    service.startService()
    try:
        await service.when_listening()
        response, body = await request("GET", ingress_url(service, "/status.ok"))
        assert response.code == 503
        assert header(response, "OpenSandbox-Ingress-Error") == "registry_not_synced"
        response, _ = await request(
            "GET", ingress_url(service, "/x"), headers={"OpenSandbox-Ingress-To": "a-80"}
        )
        assert response.code == 503
        write_sandboxes(path, [])
        await service.registry.when_synced()
        response, body = await request(
            "GET", ingress_url(service, "/status.ok"), headers={"OpenSandbox-Ingress-To": "a-80"}
        )
        assert (response.code, body) == (200, b"OK")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_two_embedded_ingresses(tmp_path: Path, backend: Backend) -> None:
    """Two ingresses in one process keep separate registries and listeners."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = await start_ingress(tmp_path / "one", [{"name": "alpha", "endpoint": "127.0.0.1"}])
    two = await start_ingress(
        tmp_path / "two", [{"name": "beta", "endpoint": "127.0.0.1"}], mode="uri"
    )
    try:
        port = backend.port_number
        r1, _ = await request(
            "GET", ingress_url(one, "/echo"), headers={"OpenSandbox-Ingress-To": f"alpha-{port}"}
        )
        r2, _ = await request(
            "GET", ingress_url(one, "/echo"), headers={"OpenSandbox-Ingress-To": f"beta-{port}"}
        )
        r3, body = await request("GET", ingress_url(two, f"/beta/{port}/echo"))
        r4, _ = await request("GET", ingress_url(two, f"/alpha/{port}/echo"))
        assert (r1.code, r2.code, r3.code, r4.code) == (200, 404, 200, 404)
        assert json.loads(body)["uri"] == "/echo"
    finally:
        await one.stopService()
        await two.stopService()


@pytest_twisted.ensureDeferred
async def test_access_log_line_has_fields_and_no_secrets(
    ingress: IngressService, backend: Backend
) -> None:
    """One access line per request, with method/sandbox/port/status/bytes/duration/client, no tokens."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await request(
            "GET",
            ingress_url(ingress, "/echo"),
            headers={
                "OpenSandbox-Ingress-To": f"private-{backend.port_number}",
                "OpenSandbox-Secure-Access": "tok-1",
                "Cookie": "session=cookie-secret",
            },
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [e for e in events if e.get("log_namespace") == "opensandbox_ingress.access"]
    assert len(access) == 1
    event = access[0]
    assert (event["method"], event["sandbox"], event["port"], event["status"]) == (
        "GET",
        "private",
        backend.port_number,
        200,
    )
    assert event["bytes"] > 0 and event["duration_ms"] >= 0 and event["client"] == "127.0.0.1"
    text = repr(events)
    assert "tok-1" not in text and "cookie-secret" not in text


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_access_line_of_an_answer_counts_the_bytes_sent(
    ingress: IngressService, method: str
) -> None:
    """An error the ingress answers itself: its line counts the body sent, none for HEAD."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response, body = await request(
            method, ingress_url(ingress, "/x"), headers={"OpenSandbox-Ingress-To": "nope-8080"}
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 404
    [event] = [e for e in events if e.get("log_namespace") == "opensandbox_ingress.access"]
    assert (event["method"], event["sandbox"], event["status"]) == (method, "nope", 404)
    if method == "HEAD":
        assert body == b"" and event["bytes"] == 0
    else:
        assert body.startswith(b"OpenSandbox Ingress: ") and event["bytes"] == len(body)


@pytest_twisted.ensureDeferred
async def test_resource_mounts_under_another_site(tmp_path: Path, backend: Backend) -> None:
    """service.resource serves under a child path of a plain Site, bodies included."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    service = await start_ingress(tmp_path, SANDBOXES, mode="uri")
    root = Resource()
    root.putChild(b"ingress", service.resource)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}/ingress"
        response, body = await request(
            "POST", f"{base}/sbx/{backend.port_number}/echo?k=v", data=b"mounted"
        )
        assert response.code == 200
        seen = json.loads(body)
        assert seen["uri"] == "/echo?k=v" and seen["body_len"] == 7
        response, body = await request("GET", f"{base}/status.ok")
        assert (response.code, body) == (200, b"OK")
    finally:
        await port.stopListening()
        await service.stopService()


# -- hold until ready -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ready_wait_completes_when_sandbox_turns_ready(
    tmp_path: Path, backend: Backend
) -> None:
    """A request for a starting sandbox waits, then goes through once it is ready."""
    import time

    from twisted.internet.defer import ensureDeferred

    service = await start_ingress(tmp_path, SANDBOXES, ready_wait_s=10)
    try:
        d = ensureDeferred(
            request(
                "GET",
                ingress_url(service, "/echo"),
                headers={"OpenSandbox-Ingress-To": f"starting-{backend.port_number}"},
            )
        )
        await wait_until(lambda: service.registry.ready_waiters == 1, what="request waiting")
        assert not d.called
        ready = [dict(s, ready=True) if s["name"] == "starting" else s for s in SANDBOXES]
        write_sandboxes(tmp_path / "sandboxes.json", ready)
        await wait_until(lambda: service.registry.lookup("starting").ready, what="reload")
        turned_ready = time.monotonic()
        response, _ = await d
        assert response.code == 200
        assert time.monotonic() - turned_ready < 1.0
        assert service.registry.ready_waiters == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_ready_wait_times_out_with_retry_after(tmp_path: Path) -> None:
    """A sandbox that stays not ready answers 503 with Retry-After after the wait."""
    service = await start_ingress(tmp_path, SANDBOXES, ready_wait_s=0.3)
    try:
        response, body = await request(
            "GET", ingress_url(service, "/"), headers={"OpenSandbox-Ingress-To": "starting-80"}
        )
        assert response.code == 503
        assert header(response, "OpenSandbox-Ingress-Error") == "sandbox_not_ready"
        assert header(response, "Retry-After") == "1"
        assert b"marked not ready" in body
        assert service.registry.ready_waiters == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_ready_wait_cancelled_when_client_leaves(tmp_path: Path) -> None:
    """A waiting client that disconnects releases its wait at once."""
    service = await start_ingress(tmp_path, SANDBOXES, ready_wait_s=30)
    try:
        client = await raw_connect(service.addresses()[0].port)
        client.transport.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: starting-80\r\n\r\n"
        )
        await wait_until(lambda: service.registry.ready_waiters == 1, what="waiting")
        client.transport.loseConnection()
        await wait_until(lambda: service.registry.ready_waiters == 0, what="wait released")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_connect_timeout_answers_upstream_timeout(tmp_path: Path) -> None:
    """A backend whose accept queue is full (SYNs unanswered) hits the connect timeout."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Fill the accept queue so that further SYNs are dropped by the kernel.
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    service = await start_ingress(tmp_path, SANDBOXES, upstream_connect_timeout_s=0.5)
    try:
        response, body = await request(
            "GET", ingress_url(service, "/"), headers={"OpenSandbox-Ingress-To": f"sbx-{port}"}
        )
        assert response.code == 502, body
        assert header(response, "OpenSandbox-Ingress-Error") == "upstream_timeout"
    finally:
        await service.stopService()
        for s in fillers:
            s.close()
        listener.close()
