"""The ingress as operators run it: a twistd process, its flags, logs and memory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.processes import (
    REPO,
    TWISTD,
    free_port,
    http_get,
    rss_kib,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)


def test_twistd_lists_the_plugin() -> None:
    """`twistd --help` lists opensandbox-ingress."""
    out = subprocess.run([*TWISTD, "--help"], cwd=REPO, capture_output=True, check=True)
    assert b"opensandbox-ingress" in out.stdout


def test_plugin_help_documents_every_flag() -> None:
    """`twistd opensandbox-ingress --help` documents every flag of SPEC sections 1 and 10."""
    out = subprocess.run(
        [*TWISTD, "opensandbox-ingress", "--help"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for flag in (
        "namespace", "all-namespaces", "provider-type", "mode", "port", "listen",
        "log-level", "secure-access-keys", "renew-intent-enabled",
        "renew-intent-redis-dsn", "renew-intent-queue-key",
        "renew-intent-queue-max-len", "renew-intent-min-interval", "sandboxes-file",
        "kubeconfig", "context", "log-format", "admin-listen",
        "upstream-connect-timeout", "idle-timeout", "websocket-ping-interval",
        "ready-wait", "shutdown-timeout", "workers", "header-timeout",
        "secure-access-keys-file", "renew-intent-redis-dsn-file", "renew-intent-shared-throttle",
    ):
        assert f"--{flag}" in out, flag


def test_wheel_installs_the_plugin_file(tmp_path: Path) -> None:
    """A built wheel carries twisted/plugins/opensandbox_ingress_plugin.py (and no __init__ there)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("opensandbox_ingress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/opensandbox_ingress_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--port", "0"], "--port"),
        (["--port", "abc"], "--port"),
        (["--mode", "path"], "--mode"),
        (["--provider-type", "etcd"], "--provider-type"),
        (["--secure-access-keys", "A=aGVsbG8="], "--secure-access-keys"),
        (["--renew-intent-redis-dsn", "http://x"], "--renew-intent-redis-dsn"),
        (["--provider-type", "file"], "--sandboxes-file"),
        (["--idle-timeout", "-1"], "--idle-timeout"),
        (["--listen", "bogus:1"], "--listen"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_flag_stops_with_one_line(args: list[str], flag: str) -> None:
    """A bad value exits non-zero with one stderr line naming the flag."""
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "opensandbox-ingress", *args],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"opensandbox-ingress: {flag}:"), lines


def test_readme_quick_start_serves_the_example_file(tmp_path: Path) -> None:
    """The README's run command serves examples/sandboxes.yaml and logs its build line."""
    backend, backend_port = start_stream_backend()
    port = free_port()
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text((REPO / "examples" / "sandboxes.yaml").read_text())
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port)],
        env={"OPENSANDBOX_INGRESS_GIT_COMMIT": "abc123"},
    )
    try:
        wait_healthy(proc, port)
        status, body = http_get(
            port, "/download?size=5", {"OpenSandbox-Ingress-To": f"demo-{backend_port}"}
        )
        assert (status, body) == (200, b"xxxxx")
        status, _ = http_get(port, "/", {"OpenSandbox-Ingress-To": f"starting-{backend_port}"})
        assert status == 503
    finally:
        out, _ = stop(proc)
        stop(backend)
    text = out.decode()
    assert "version=dev commit=abc123 built=unknown python=" in text
    assert text.count("opensandbox-ingress version=") == 1
    # Twisted's port lines are filtered; the ingress's own line says it once.
    assert "starting on" not in text and "Closed)" not in text, text
    assert text.count(f"listening on tcp:{port} ") == 1, text


def test_json_log_format(tmp_path: Path) -> None:
    """--log-format json writes one JSON object per line, access lines included."""
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text('[{"name": "a", "endpoint": "127.0.0.1"}]')
    port = free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--log-format", "json"]
    )
    try:
        wait_healthy(proc, port)
        http_get(port, "/", {"OpenSandbox-Ingress-To": "missing-80"})
    finally:
        out, _ = stop(proc)
    records = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    access = [r for r in records if r.get("namespace") == "opensandbox_ingress.access"]
    assert access and access[0]["status"] == 404 and access[0]["level"] == "info"
    assert any("version" in r for r in records)


def test_log_level_warn_hides_info(tmp_path: Path) -> None:
    """--log-level warn drops info lines such as the access log."""
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text("[]")
    port = free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--log-level", "warn"]
    )
    try:
        wait_healthy(proc, port)
        http_get(port, "/", {"OpenSandbox-Ingress-To": "missing-80"})
    finally:
        out, _ = stop(proc)
    assert b"status=404" not in out


def _stream_through(
    port: int, request: bytes, upload: int = 0, chunk: bytes = b"u" * (1 << 20)
) -> tuple[bytes, int]:
    """Send a request (and C{upload} body bytes); return the head and body size read."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        sent = 0
        while sent < upload:
            piece = chunk[: min(len(chunk), upload - sent)]
            sock.sendall(piece)
            sent += len(piece)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, data
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = len(rest)
        while got < length:
            more = sock.recv(1 << 20)
            assert more
            got += len(more)
        return head, got


def test_gigabyte_download_and_upload_keep_rss_flat(tmp_path: Path) -> None:
    """1 GiB each way streams through the ingress with its peak RSS growing < 64 MiB."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text('[{"name": "big", "endpoint": "127.0.0.1"}]')
    port = free_port()
    proc = twistd(["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port)])
    size = 1 << 30
    try:
        wait_healthy(proc, port)
        http_get(port, "/download?size=1000", {"OpenSandbox-Ingress-To": f"big-{backend_port}"})
        baseline = rss_kib(proc.pid)
        head, got = _stream_through(
            port,
            b"GET /download?size=%d HTTP/1.1\r\nHost: big-%d\r\n\r\n" % (size, backend_port),
        )
        assert head.startswith(b"HTTP/1.1 200") and got == size
        head, got = _stream_through(
            port,
            b"PUT /upload HTTP/1.1\r\nHost: big-%d\r\nContent-Length: %d\r\n\r\n"
            % (backend_port, size),
            upload=size,
        )
        assert head.startswith(b"HTTP/1.1 200")
        peak = rss_kib(proc.pid, "VmHWM")
    finally:
        stop(proc)
        stop(backend)
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 64, f"peak RSS grew {growth_mib:.1f} MiB"


def test_port_in_use_stops_the_process(tmp_path: Path) -> None:
    """A listener that cannot bind stops the ingress with a clear log line instead of idling."""
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text("[]")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = twistd(
            ["--provider-type", "file", "--sandboxes-file", str(sandboxes),
             "--listen", f"tcp:{port}:interface=127.0.0.1"]
        )
        try:
            proc.wait(15)
        finally:
            out, _ = stop(proc)
    assert b"cannot listen" in out
