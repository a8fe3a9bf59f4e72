"""Process limits the ingress sets for itself at start-up."""

from __future__ import annotations

import resource
from pathlib import Path

from tests.processes import free_port, stop, twistd, wait_healthy


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_open_files_soft_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Started with a soft limit of 256, the running ingress has the hard limit as its soft one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 256

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    sandboxes = tmp_path / "s.json"
    sandboxes.write_text("[]")
    port = free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port)],
        preexec_fn=low_soft_limit,
    )
    try:
        wait_healthy(proc, port)
        soft = _soft_nofile(proc.pid)
    finally:
        stop(proc)
    expected = min(hard, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    assert soft == expected
