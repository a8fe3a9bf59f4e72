"""--listen endpoint strings: TCP, IPv6, unix sockets and TLS, several at once."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
from pathlib import Path

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.threads import deferToThread

from tests.backend import Backend
from tests.helpers import start_ingress


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "key.pem"
    cert_path = directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _get(conn: http.client.HTTPConnection, route: str) -> tuple[int, dict[str, object]]:
    conn.request("GET", "/echo", headers={"OpenSandbox-Ingress-To": route})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body) if response.status == 200 else {}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


@pytest_twisted.ensureDeferred
async def test_tcp_ipv6_unix_and_tls_listeners_all_serve(tmp_path: Path, backend: Backend) -> None:
    """One ingress serves the same routes on IPv4, IPv6 loopback, a unix socket and TLS."""
    key, cert = make_certificate(tmp_path)
    sock = tmp_path / "ingress.sock"
    service = await start_ingress(
        tmp_path,
        [{"name": "sbx", "endpoint": "127.0.0.1"}],
        listen=(
            "tcp:0:interface=127.0.0.1",
            r"tcp6:0:interface=\:\:1",
            f"unix:{sock}",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        ),
    )
    try:
        route = f"sbx-{backend.port_number}"
        ports = {type(a).__name__: a for a in service.addresses()}
        v4 = [a for a in service.addresses() if getattr(a, "host", None) == "127.0.0.1"]
        v6 = [a for a in service.addresses() if getattr(a, "host", None) == "::1"]
        assert len(v4) == 2 and len(v6) == 1 and "UNIXAddress" in ports
        tls_port = v4[1].port
        context = ssl.create_default_context(cafile=str(cert))

        def run() -> list[tuple[int, dict[str, object]]]:
            return [
                _get(http.client.HTTPConnection("127.0.0.1", v4[0].port), route),
                _get(http.client.HTTPConnection("::1", v6[0].port), route),
                _get(_UnixHTTPConnection(str(sock)), route),
                _get(http.client.HTTPSConnection("127.0.0.1", tls_port, context=context), route),
            ]

        results = await deferToThread(run)
        assert [status for status, _ in results] == [200, 200, 200, 200]
        protos = [
            dict((k.lower(), v) for k, v in seen["headers"])["x-forwarded-proto"]  # type: ignore[union-attr]
            for _, seen in results
        ]
        assert protos == ["http", "http", "http", "https"]
    finally:
        await service.stopService()
