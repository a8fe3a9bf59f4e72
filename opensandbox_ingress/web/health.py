"""The health check and the root resource that dispatches to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..errors import RegistryNotSynced, ShuttingDown
from .decision import is_health
from .errors import render_error
from .proxy import Proxy, ProxyResource, local_uri

if TYPE_CHECKING:
    from ..service import IngressCore


class HealthResource(Resource):
    """
    C{/status.ok}: 200 C{OK} once the registry is synced and the ingress is
    not draining; 503 with a reason otherwise.
    """

    isLeaf = True

    def __init__(self, core: IngressCore) -> None:
        super().__init__()
        self._core = core

    def render(self, request: Request) -> Any:
        if self._core.draining:
            render_error(request, ShuttingDown("ingress is shutting down"))
        elif not self._core.registry.synced:
            render_error(request, RegistryNotSynced("sandbox registry is not synced yet"))
        else:
            request.responseHeaders.removeHeader(b"Server")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Content-Length", b"2")
            return b"OK"
        return NOT_DONE_YET


class IngressResource(Resource):
    """
    The root of the proxy port: exactly C{/status.ok} is the health check,
    every other path goes to the proxy.  Mountable under another site.
    """

    isLeaf = True

    def __init__(self, core: IngressCore, proxy: Proxy) -> None:
        super().__init__()
        self.health = HealthResource(core)
        self.proxy = ProxyResource(proxy)

    def render(self, request: Request) -> Any:
        if is_health(local_uri(request)):
            return self.health.render(request)
        return self.proxy.render(request)
