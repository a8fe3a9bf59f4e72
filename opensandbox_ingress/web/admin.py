"""
The admin listener (C{--admin-listen}): metrics and a read-only routing view.

Served on its own port so that no path is taken from the proxy port (every
path there belongs to the sandboxes).  Paths:

- C{/metrics}: Prometheus text format.
- C{/sandboxes}: JSON list of every record the registry holds.
- C{/sandboxes/{id}}: how a sandbox id resolves: the resource names tried,
  the outcome, the record, and why it is not ready.
- C{/status.ok}: the same health answer as the proxy port: the readiness
  probe (503 until the registry is synced, and while draining).
- C{/livez}: the liveness probe: 200 whenever this process answers at all,
  whatever the sync or drain state.  Being answered is the proof that the
  reactor turns; a blocked reactor leaves the probe to time out.  It must
  not follow sync: an API server slow at start-up would otherwise get every
  replica restarted in a loop, which only adds load to it.

Secure-access tokens are never shown, only whether a sandbox requires one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..errors import IngressError
from ..registry import SandboxRecord
from .health import HealthResource

if TYPE_CHECKING:
    from ..service import IngressCore

#: The liveness probe's path on the admin listener.
LIVENESS_PATH = b"/livez"


def record_view(record: SandboxRecord) -> dict[str, Any]:
    """A record as JSON, without its access token."""
    return {
        "name": record.name,
        "namespace": record.namespace,
        "endpoint": record.endpoint,
        "ready": bool(record.ready and record.endpoint),
        "not_ready_reason": None
        if record.ready and record.endpoint
        else (record.not_ready_reason or "no endpoint"),
        "secure_access": record.secure_access_token is not None,
        "generation": record.generation,
    }


class AdminResource(Resource):
    """The admin port's only resource; dispatches on the path."""

    isLeaf = True

    def __init__(self, core: IngressCore) -> None:
        super().__init__()
        self._core = core
        self._health = HealthResource(core)

    def render_GET(self, request: Request) -> bytes:
        path: bytes = request.path
        if path == b"/metrics":
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            tree = self._core.metrics.tree_exposition
            if tree is None:
                return self._core.metrics.exposition()
            # --workers: the supervisor merges every worker's metrics.
            finished: list[object] = []
            request.notifyFinish().addBoth(finished.append)

            def write(body: bytes) -> None:
                if not finished:  # the scraper may have gone meanwhile
                    request.setHeader(b"Content-Length", str(len(body)).encode())
                    request.write(body)
                    request.finish()

            tree().addCallback(write)
            return NOT_DONE_YET  # type: ignore[return-value]
        if path == b"/status.ok":
            return self._health.render(request)  # type: ignore[no-any-return]
        if path == LIVENESS_PATH:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"OK"
        if path == b"/sandboxes":
            registry = self._core.registry
            return _json(
                request,
                {
                    "synced": registry.synced,
                    "count": len(registry),
                    "sandboxes": [record_view(r) for r in registry.records()],
                },
            )
        if path.startswith(b"/sandboxes/"):
            sandbox_id = unquote(path[len(b"/sandboxes/") :].decode("utf-8", "replace"))
            return _json(request, self.explain(sandbox_id))
        request.setResponseCode(404)
        return _json(request, {"error": "no such admin path"})

    def explain(self, sandbox_id: str) -> dict[str, Any]:
        """How C{sandbox_id} resolves right now, in words and data."""
        registry = self._core.registry
        view: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "names_tried": list(registry.candidates(sandbox_id)),
        }
        try:
            record = registry.lookup(sandbox_id)
        except IngressError as e:
            view.update(outcome=e.code, status=e.status, reason=e.reason)
            return view
        details = record_view(record)
        if details["ready"]:
            view.update(outcome="ready", status=200, reason="ready")
        else:
            view.update(outcome="sandbox_not_ready", status=503, reason=details["not_ready_reason"])
        view["record"] = details
        return view


def _json(request: Request, value: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value, indent=2).encode() + b"\n"


class AdminSite(Site):
    """The admin port's C{Site}: quiet, no access log of its own."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        pass
