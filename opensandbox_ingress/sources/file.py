"""
The file provider: sandboxes listed in a local JSON or YAML file.

The zero-dependency way to run the ingress (no Kubernetes).  The file is a
list of objects::

    - name: sbx-demo            # required, the sandbox id
      endpoint: 127.0.0.1       # host of the sandbox (IP or DNS name)
      ready: true               # optional, default true
      secure_access_token: tok  # optional: requires OSEP-0011 access

(or a mapping with a C{sandboxes} key holding that list).  The file is
checked for changes every C{poll_interval_s} seconds (modification time,
size and inode) and re-read when it changed; a broken file keeps the last
good state and logs why, once per distinct problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import yaml
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..polling import PollingService
from ..registry import SandboxRecord, SandboxRegistry

#: Seconds between two checks of the file for changes.
POLL_INTERVAL_S = 1.0


class SandboxFileError(ValueError):
    """The sandboxes file cannot be used; the message says why."""


def parse_sandboxes(text: str, path: str = "<sandboxes>") -> list[SandboxRecord]:
    """
    Parse the file's text (JSON or YAML) into records.

    @raise SandboxFileError: with a message naming the entry and field.
    """
    try:
        if path.endswith(".json"):
            data: Any = json.loads(text)
        else:
            # YAML is a superset of JSON, so this also reads JSON files that
            # are not named .json.
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SandboxFileError(f"{path}: not valid JSON/YAML: {first}") from None
    if data is None:
        data = []
    if isinstance(data, dict) and "sandboxes" in data:
        data = data["sandboxes"]
    if not isinstance(data, list):
        raise SandboxFileError(f"{path}: expected a list of sandboxes")
    records: list[SandboxRecord] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise SandboxFileError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "endpoint", "ready", "secure_access_token"}
        if unknown:
            raise SandboxFileError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SandboxFileError(f"{where}: 'name' must be a non-empty string")
        name = name.strip()
        if name in seen:
            raise SandboxFileError(f"{where}: name {name!r} appears twice")
        seen.add(name)
        endpoint = entry.get("endpoint")
        if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.strip()):
            raise SandboxFileError(f"{where} ({name}): 'endpoint' must be a non-empty string")
        ready = entry.get("ready", True)
        if not isinstance(ready, bool):
            raise SandboxFileError(f"{where} ({name}): 'ready' must be true or false")
        token = entry.get("secure_access_token")
        if token is not None and not isinstance(token, str):
            raise SandboxFileError(f"{where} ({name}): 'secure_access_token' must be a string")
        token = token.strip() if token else None
        endpoint = endpoint.strip() if endpoint else None
        reason = ""
        if not endpoint:
            reason = "no endpoint in the sandboxes file"
        elif not ready:
            reason = "marked not ready in the sandboxes file"
        generation = hashlib.sha256(
            json.dumps([name, endpoint, ready, token]).encode()
        ).hexdigest()[:16]
        records.append(
            SandboxRecord(
                name=name,
                endpoint=endpoint,
                ready=bool(ready and endpoint),
                not_ready_reason=reason,
                secure_access_token=token or None,
                generation=f"file:{generation}",
            )
        )
    return records


class FileSource(PollingService):
    """
    Feeds a registry from a sandboxes file, re-reading it when it changes.

    Ownership: reactor thread (the file is small; reading it is quick).
    The registry is marked synced by the first successful read; if the file
    is broken at start-up, the ingress stays unsynced (health 503) until it
    is fixed.
    """

    _log = Logger()
    rejected_format = "sandboxes file rejected, keeping the last good state: {problem}"

    def __init__(
        self,
        reactor: IReactorTime,
        registry: SandboxRegistry,
        path: str,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(reactor, poll_interval_s)
        self._registry = registry
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        #: Successful loads of the file (rejected versions: C{failures}).
        self.loads = 0

    def check(self) -> None:
        """Re-read the file if it changed since the last look."""
        try:
            st = os.stat(self._path)
        except OSError as e:
            self.rejected(f"{self._path}: cannot read: {e.strerror}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self._path, encoding="utf-8") as f:
                text = f.read()
            records = parse_sandboxes(text, self._path)
        except OSError as e:
            self.rejected(f"{self._path}: cannot read: {e.strerror}")
            return
        except UnicodeDecodeError:
            self.rejected(f"{self._path}: not UTF-8 text")
            return
        except SandboxFileError as e:
            self.rejected(str(e))
            return
        self._apply(records)

    def _apply(self, records: Iterable[SandboxRecord]) -> None:
        records = list(records)
        self._registry.replace_all(records)
        self.loads += 1
        self.accepted()
        self._log.info(
            "loaded {count} sandboxes from {path}", count=len(records), path=self._path
        )
