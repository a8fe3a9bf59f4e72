"""
Secrets off the command line, on a running ingress process: keys rotate
through C{--secure-access-keys-file} without a restart, and the Redis DSN
comes from a file or the environment to a password-protected
C{redis-server}; no secret shows in logs, argv or the admin views.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from opensandbox_ingress.secret_files import DSN_ENV
from opensandbox_ingress.secure_access import signed_host_token
from tests.conftest_redis import redis_server_factory  # noqa: F401
from tests.processes import (
    REPO,
    TWISTD,
    free_port,
    http_get,
    poll,
    start_stream_backend,
    stop,
    twistd,
)
from tests.redis_server import RedisServer

#: The issue's bound: a rotation is visible this soon after the file changes.
VISIBLE_S = 2.0

SECRET_OLD = b"old-secret-\x01\x02"
SECRET_NEW = b"new-secret-\x03\x04"
OLD = f"a={base64.b64encode(SECRET_OLD).decode()}"
NEW = f"b={base64.b64encode(SECRET_NEW).decode()}"

PASSWORD = "pw-Zq81-never-logged"
ACL_USER = f"renewer on >{PASSWORD} resetchannels ~opensandbox:* +@list +@connection"


def write(path: Path, text: str) -> None:
    """Replace C{path} atomically (a Secret volume update swaps, never truncates)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """C{twistd ... opensandbox-ingress ARGS} with stdout and stderr to C{log}, readable while it runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSANDBOX_INGRESS_")}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "-l", "-", "opensandbox-ingress", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"ingress exited {proc.returncode}: {out!r} {err!r}")


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    def ready() -> bool:
        _alive(proc)
        try:
            return http_get(port, "/status.ok")[0] == 200
        except OSError:
            return False

    poll(ready, 30, "/status.ok 200")


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants (the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def argv_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_keys_rotate_on_a_running_ingress(tmp_path: Path, workers: str) -> None:
    """Old key accepted; new key added; old key removed; a broken file keeps the keys: each within 2 s."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(
        json.dumps([{"name": "sec", "endpoint": "127.0.0.1", "secure_access_token": "tok"}])
    )
    keys = tmp_path / "keys"
    write(keys, OLD + "\n")
    port = free_port()
    log = tmp_path / "ingress.log"
    proc = start(
        [
            "--provider-type", "file", "--sandboxes-file", str(sandboxes),
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", workers,
            f"--secure-access-keys-file={keys}",
        ],
        log,
    )
    expires = int(time.time()) + 3600
    by_old = signed_host_token(SECRET_OLD, "a", "sec", backend_port, expires)
    by_new = signed_host_token(SECRET_NEW, "b", "sec", backend_port, expires)

    def status(token: str) -> int:
        return http_get(port, "/download?size=3", {"OpenSandbox-Ingress-To": token})[0]

    def within_2s(token: str, expected: int, what: str) -> None:
        # Timed from the file's change, until a run of ten fresh
        # connections (spread over the workers by the kernel, each of
        # which reads the file on its own clock) all agree.
        changed = time.monotonic()
        poll(lambda: all(status(token) == expected for _ in range(10)), VISIBLE_S, what,
             interval=0.05)
        assert time.monotonic() - changed <= VISIBLE_S + 0.5, what

    try:
        _wait_ready(proc, port)
        assert status(by_old) == 200
        assert status(by_new) == 401

        write(keys, f"{OLD}\n{NEW}\n")
        within_2s(by_new, 200, "the new key accepted")
        assert status(by_old) == 200

        write(keys, NEW + "\n")
        within_2s(by_old, 401, "the old key refused")
        assert status(by_new) == 200

        write(keys, f"{NEW}\nc=not*base64\n")
        # The next poll rejects it; the keys in use do not change.
        poll(lambda: "keeping the last good keys" in log.read_text(), 5, "the rejection logged")
        assert all(status(by_new) == 200 for _ in range(10))
        assert status(by_old) == 401
        pids = tree(proc.pid)
        assert len(pids) >= int(workers)
        assert not any("new-secret" in argv_of(p) or NEW in argv_of(p) for p in pids)
    finally:
        stop(proc)
        stop(backend)
    logs = log.read_text()
    assert "key ids a,b" in logs and "key ids b" in logs
    rejected = [line for line in logs.splitlines() if "keeping the last good keys" in line]
    assert 1 <= len(rejected) <= int(workers), rejected  # once per process
    for secret in (OLD, NEW, OLD.split("=", 1)[1], NEW.split("=", 1)[1]):
        assert secret not in logs


@pytest.mark.parametrize("source", ["file", "env"])
def test_dsn_from_file_or_environment_reaches_a_password_protected_redis(
    tmp_path: Path, source: str, redis_server_factory: Callable[..., RedisServer]  # noqa: F811
) -> None:
    """Intents reach Redis with the password; it is in no log line, argv or admin view."""
    server = redis_server_factory(acl_users=[ACL_USER])
    dsn = server.dsn(user="renewer", password=PASSWORD)
    key = "opensandbox:renew:secret-dsn"
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(json.dumps([{"name": "sbx", "endpoint": "127.0.0.1"}]))
    port, admin = free_port(), free_port()
    args = [
        "--provider-type", "file", "--sandboxes-file", str(sandboxes),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
        "--workers", "2",
        "--renew-intent-enabled", "--renew-intent-queue-key", key,
    ]
    env = {}
    if source == "file":
        dsn_file = tmp_path / "dsn"
        dsn_file.write_text(dsn + "\n")
        args.append(f"--renew-intent-redis-dsn-file={dsn_file}")
    else:
        env[DSN_ENV] = dsn
    proc = twistd(args, env=env)

    def published() -> bool:
        _alive(proc)
        status, _ = http_get(port, "/download?size=3", {"OpenSandbox-Ingress-To": f"sbx-{backend_port}"})
        assert status == 200
        client = server.client()
        try:
            return int(client.llen(key)) >= 1
        finally:
            client.close()

    try:
        _wait_ready(proc, port)
        poll(published, 15, "an intent in Redis")
        pids = tree(proc.pid)
        assert len(pids) >= 3, pids  # the supervisor and two workers
        for pid in pids:
            assert PASSWORD not in argv_of(pid), pid
        # The workers got the DSN on stdin, not in their environment.
        for pid in pids[1:]:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert PASSWORD.encode() not in environ, pid
        views = b"".join(http_get(admin, path)[1] for path in ("/sandboxes", "/metrics", "/sandboxes/sbx"))
        assert PASSWORD.encode() not in views
    finally:
        out, err = stop(proc)
        stop(backend)
    logs = (out + err).decode()
    assert f"redis://renewer:***@127.0.0.1:{server.port}/0" in logs
    assert PASSWORD not in logs
