"""
The real parts of the browser end-to-end test, shared with
C{bench/lab_load.py}: a JupyterLab server as the sandbox, the ingress as a
real C{twistd} process on the file provider, and Debian's Chromium driven
by Playwright.

Everything listens on loopback ports picked free at start; every wait has a
deadline; every process is stopped by the object that started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from tests.processes import free_port, poll

REPO = Path(__file__).resolve().parent.parent

#: Debian's Chromium; Playwright's own browser download is not reachable.
CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
#: Without these, Chromium's background connections (updates, sync, field
#: trials, QUIC probes) go to hosts a closed network refuses, and the GPU
#: process fails in a container.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: The sandbox's name in the file provider.
SANDBOX = "nb"
#: Jupyter's token: its default login, passed once in the first URL.
TOKEN = "e2e-token-0123456789"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call C{predicate} until it is truthy or C{timeout} seconds pass."""
    return poll(predicate, timeout, what, interval=0.05)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a GET of C{url}; 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


@dataclass(frozen=True)
class Mode:
    """
    One way to reach the notebook through the ingress.

    @ivar name: C{header} or C{uri}.
    @ivar ingress_flags: the ingress's routing flags for browser apps.
    @ivar jupyter_flags: Jupyter's settings beyond its defaults.
    """

    name: str
    ingress_flags: tuple[str, ...]
    jupyter_flags: tuple[str, ...]

    def base_url(self, jupyter_port: int) -> str:
        """Jupyter's C{base_url}: C{/} in header mode, the route prefix in URI mode."""
        return f"/{SANDBOX}/{jupyter_port}/" if self.name == "uri" else "/"

    def url(self, ingress_port: int, jupyter_port: int) -> str:
        """The app's root URL through the ingress (ends with C{/})."""
        if self.name == "uri":
            return f"http://127.0.0.1:{ingress_port}{self.base_url(jupyter_port)}"
        # Chromium resolves every *.localhost name to loopback by itself.
        return f"http://{SANDBOX}-{jupyter_port}.localhost:{ingress_port}/"


#: Header mode, routed by Host: Jupyter compares Origin with Host, so the
#: client's Host must reach it; it listens on loopback here, where its
#: host check refuses names other than localhost (in a pod it listens on
#: the pod's address, where remote access is already its default).
HEADER = Mode(
    "header",
    ("--preserve-host",),
    ("--ServerApp.allow_remote_access=True",),
)
#: URI mode: Jupyter serves under /nb/{port}/ and gets the whole path; the
#: page's Origin is the ingress's address, so Host is kept here too.
URI = Mode(
    "uri",
    ("--mode", "uri", "--uri-keep-prefix", "--preserve-host"),
    (),
)
MODES = (HEADER, URI)


#: The user's display preferences (not settings the ingress needs): the
#: terminal keeps its text in the page (xterm's accessibility rows; its
#: WebGL canvas holds none a test can read), and no news toast covers the
#: page or asks a website for news.
USER_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/terminal-extension/plugin": {"screenReaderMode": True},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Jupyter:
    """A JupyterLab server in its own directory, on a free loopback port."""

    def __init__(self, workdir: Path, mode: Mode, log: IO[bytes]) -> None:
        self.port = free_port()
        self.root = workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        home = workdir / "home"
        home.mkdir(exist_ok=True)
        self.base_url = mode.base_url(self.port)
        settings = home / "lab-settings"
        for plugin, values in USER_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ)
        # Its own config, data and runtime dirs: no state from another run.
        env.update(
            HOME=str(home),
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            SHELL="/bin/sh",
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={self.port}",
                "--port-retries=0",
                f"--ServerApp.root_dir={self.root}",
                f"--ServerApp.base_url={self.base_url}",
                f"--IdentityProvider.token={TOKEN}",
                # No outgoing calls for update checks on a closed network.
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly",
                # CI runs as root, which Jupyter refuses unless told.
                *(["--allow-root"] if os.geteuid() == 0 else []),
                *mode.jupyter_flags,
            ],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    @property
    def direct_url(self) -> str:
        """The app's root URL without the ingress."""
        return f"http://127.0.0.1:{self.port}{self.base_url}"

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter exited with {self.proc.returncode}")
            return http_status(self.direct_url + "api") == 200

        wait_for(ready, timeout, "jupyter's /api")

    def stop(self) -> None:
        _stop(self.proc)


class Ingress:
    """The ingress as a real twistd process (file provider) on a free port."""

    def __init__(self, workdir: Path, mode: Mode, log: IO[bytes]) -> None:
        self.port = free_port()
        sandboxes = workdir / "sandboxes.json"
        sandboxes.write_text(json.dumps([{"name": SANDBOX, "endpoint": "127.0.0.1"}]))
        env = dict(os.environ)
        env.pop("OPENSANDBOX_INGRESS_VERSION", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "-l",
                "-",
                "opensandbox-ingress",
                "--provider-type",
                "file",
                "--sandboxes-file",
                str(sandboxes),
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
                *mode.ingress_flags,
            ],
            cwd=REPO,
            env=env,
            # A file, not a pipe: a full pipe would stall the ingress.
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"ingress exited with {self.proc.returncode}")
            return http_status(f"http://127.0.0.1:{self.port}/status.ok") == 200

        wait_for(ready, timeout, "ingress /status.ok")

    def stop(self) -> None:
        _stop(self.proc)


def launch_chromium(playwright: Any) -> Any:
    """Headless Chromium from Debian; Playwright gives it a fresh profile."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
    )
