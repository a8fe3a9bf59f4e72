"""twistd plugin: C{twistd [-n] opensandbox-ingress [options]}."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _IngressServiceMaker:
    tapname = "opensandbox-ingress"
    description = "HTTP/WebSocket ingress for OpenSandbox sandboxes."

    @property
    def options(self) -> Any:
        from opensandbox_ingress.options import IngressOptions

        return IngressOptions

    def makeService(self, options: Any) -> Any:
        from opensandbox_ingress.plugin import make_service

        return make_service(options)


serviceMaker = _IngressServiceMaker()
