"""
Sandbox sources: services that feed a L{SandboxRegistry}.

A source is an C{IService}; once started it delivers a first snapshot with
C{registry.replace_all} (which marks the registry synced) and then single
events with C{registry.upsert} / C{registry.remove}, always on the reactor
thread.  L{build_source} picks one from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import IService

from ..config import IngressConfig
from ..registry import SandboxRegistry


def name_candidates_for(config: IngressConfig) -> Callable[[str], Sequence[str]]:
    """The registry's sandbox-id-to-resource-names mapping for a provider."""
    if config.provider_type == "agent-sandbox":
        from .agentsandbox import name_candidates

        return name_candidates
    return lambda sandbox_id: (sandbox_id,)


def build_source(
    config: IngressConfig, registry: SandboxRegistry, reactor: Any
) -> IService:
    """Build the source service that C{config.provider_type} names."""
    if config.provider_type == "file":
        from .file import FileSource

        assert config.sandboxes_file is not None
        return FileSource(reactor, registry, config.sandboxes_file)
    from .kubernetes import build_kubernetes_source

    return build_kubernetes_source(config, registry, reactor)
