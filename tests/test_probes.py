"""
Kubernetes probes on a real ingress process: liveness (C{/livez} on the
admin listener) answers 200 from start-up on, whatever the sync state;
readiness (C{/status.ok}) answers 503 until the first list is applied.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._kube_helpers import batchsandbox, write_kubeconfig
from tests.fake_kube_api import FakeKubeAPI
from tests.processes import free_port, http_get, poll, stop, twistd

NS = "opensandbox"


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    """A fake API server of this test's own."""
    with FakeKubeAPI() as api:
        yield api


def _status(port: int, path: str) -> int | None:
    """The status of GET C{path}, or None while nothing listens."""
    try:
        return http_get(port, path)[0]
    except OSError:
        return None


def _alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"ingress exited {proc.returncode}: {out!r} {err!r}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_liveness_answers_before_the_first_sync_while_readiness_waits(
    fake: FakeKubeAPI, tmp_path: Path, workers: str
) -> None:
    """An API server that holds the first list: /livez 200, /status.ok 503; then both 200."""
    fake.create(batchsandbox("sbx", NS, endpoints=["127.0.0.1"]), plural="batchsandboxes")
    # Every request fails until clear_failures(): the registry cannot
    # sync, in any worker; retries are quick so the recovery is too.
    fake.fail_next(1_000_000)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    port, admin = free_port(), free_port()
    proc = twistd(
        [
            "--kubeconfig", str(kubeconfig), "--namespace", NS, "--workers", workers,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
        ],
        env={
            "OPENSANDBOX_INGRESS_BACKOFF_BASE_S": "0.05",
            "OPENSANDBOX_INGRESS_BACKOFF_CAP_S": "0.2",
        },
    )
    try:
        def live() -> bool:
            _alive(proc)
            return _status(admin, "/livez") == 200

        poll(live, 30, "/livez 200")
        poll(lambda: fake.requests, 30, "the first list request")
        assert _status(admin, "/status.ok") == 503
        assert _status(port, "/status.ok") == 503
        assert http_get(admin, "/livez")[1] == b"OK"

        fake.clear_failures()

        def ready() -> bool:
            _alive(proc)
            return _status(port, "/status.ok") == 200

        poll(ready, 30, "/status.ok 200 after the list")
        assert _status(admin, "/livez") == 200
        # The proxy port has no liveness path: every other path is a sandbox's.
        assert _status(port, "/livez") == 400
    finally:
        stop(proc)
