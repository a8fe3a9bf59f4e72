"""
A real C{redis-server} for tests: started on a free 127.0.0.1 port in a
temporary directory, without persistence, optionally with ACL users; it can
be stopped and started again on the same port (to test reconnection).

    server = RedisServer(tmp_path, acl_users=["renewer on >s3cret ~* +@all"])
    server.start()
    server.client().lrange("key", 0, -1)
    server.dsn(user="renewer", password="s3cret")
    server.stop(); server.start()      # same port
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

#: Seconds to wait for the server to answer PING after spawning it.
START_TIMEOUT_S = 10.0
#: Seconds to wait for it to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: Seconds between two PING attempts while it starts (a poll, not a wait).
_POLL_S = 0.01


def redis_server_executable() -> str | None:
    """The C{redis-server} on C{PATH} (or C{/usr/bin}), or C{None}."""
    return shutil.which("redis-server") or shutil.which(
        "redis-server", path="/usr/bin:/usr/sbin:/usr/local/bin"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """
    One C{redis-server} process owned by a test.

    @ivar port: the TCP port, chosen at construction and kept across
        restarts.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        acl_users: Sequence[str] = (),
        port: int | None = None,
        executable: str | None = None,
    ) -> None:
        """
        @param directory: where the config, log and working files go.
        @param acl_users: ACL rules, one user each, as in a C{user} line of
            C{redis.conf} without the keyword (e.g. C{"alice on >pw ~* +@all"});
            the C{default} user stays enabled without a password so that
            L{client} can inspect the server.
        """
        found = executable or redis_server_executable()
        if found is None:
            raise RuntimeError("redis-server not found; install the redis-server package")
        self.executable = found
        self.directory = Path(directory)
        self.port = port if port is not None else free_port()
        self.acl_users = tuple(acl_users)
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """C{redis://host:port/0} for the default user."""
        return f"redis://{self.host}:{self.port}/0"

    def dsn(self, *, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """A DSN for this server, with C{user:password@} when given."""
        auth = ""
        if user is not None or password is not None:
            auth = f"{user or ''}:{password or ''}@"
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {self.directory}",
            f"logfile {self.log_path}",
            "daemonize no",
            "save ''",
            "appendonly no",
            "user default on nopass ~* &* +@all",
        ]
        lines += [f"user {rule}" for rule in self.acl_users]
        path = self.directory / "redis.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Spawn the server and return once it answers PING."""
        if self.running:
            raise RuntimeError("redis-server already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        # Persistence is off in the config too; the flags make it explicit.
        self._process = subprocess.Popen(
            [self.executable, str(config), "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = redis.Redis(
            host=self.host, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._process.returncode}: {self._log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"redis-server did not answer PING within {timeout}s: {self._log_tail()}"
                    )
                time.sleep(_POLL_S)
        finally:
            probe.close()

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Terminate the server (SIGKILL if SIGTERM is not enough) and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Stop and start again on the same port (the data is gone)."""
        self.stop()
        self.start(timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client as the C{default} user; the caller closes it."""
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
