"""
opensandbox-ingress: an HTTP/WebSocket ingress for OpenSandbox on Twisted.

The public API for embedding::

    from opensandbox_ingress import IngressConfig, build_ingress

    service = build_ingress(IngressConfig(provider_type="file",
                                          sandboxes_file="sandboxes.yaml",
                                          listen=("tcp:8080",)))
    service.setServiceParent(application)   # or service.startService()
    # service.resource is the Resource tree, mountable in another Site.
"""

from .config import ConfigError, IngressConfig, RenewIntentConfig
from .errors import IngressError
from .registry import SandboxRecord, SandboxRegistry
from .service import IngressService, build_ingress

__all__ = [
    "ConfigError",
    "IngressConfig",
    "IngressError",
    "IngressService",
    "RenewIntentConfig",
    "SandboxRecord",
    "SandboxRegistry",
    "build_ingress",
]
