"""
The provider table: every C{--provider-type} in one place.

Each row names a provider and says everything the rest of the ingress needs
from it: how to build its source, which Kubernetes resource it watches (if
any) and how that resource becomes a record, how a sandbox id maps to
resource names, and which settings it requires.  The command line's choices
and default, the configuration's validation, the registry's name mapping and
the source construction are all read from L{PROVIDERS}, so adding a provider
is one new module (its record converter, or its source) plus one row here.

Importing this module stays cheap: the Kubernetes client is imported only
when a Kubernetes source is built.  L{opensandbox_ingress.config} imports
this module, so nothing here imports the configuration at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService

from ..config_error import ConfigError
from ..registry import SandboxRegistry
from . import agentsandbox
from ._kube_objects import ResourceKind
from .agentsandbox import AGENTSANDBOX_KIND
from .batchsandbox import BATCHSANDBOX_KIND

if TYPE_CHECKING:
    from ..config import IngressConfig

#: Builds a provider's source: C{(provider, config, registry, reactor)}.
SourceBuilder = Callable[["Provider", "IngressConfig", SandboxRegistry, Any], IService]


def same_name(sandbox_id: str) -> Sequence[str]:
    """The name mapping of providers whose resource is named by the id."""
    return (sandbox_id,)


@dataclass(frozen=True)
class Provider:
    """
    One row of the provider table.

    @ivar name: The C{--provider-type} value.
    @ivar build_source: Builds the source service that feeds the registry
        (see L{opensandbox_ingress.sources}); called once at start-up.
    @ivar kind: The Kubernetes resource watched (API group, version, plural
        and the pure record converter), or C{None} for a provider that is
        not a Kubernetes resource.
    @ivar name_candidates: Resource names to try, in order, for a sandbox
        id (the registry's lookup).
    @ivar required_settings: L{IngressConfig} fields that must be set with
        this provider; the flag named in the error is the field's name
        with C{-} for C{_}.
    """

    name: str
    build_source: SourceBuilder
    kind: ResourceKind | None = None
    name_candidates: Callable[[str], Sequence[str]] = same_name
    required_settings: tuple[str, ...] = ()

    def check_settings(self, config: IngressConfig) -> None:
        """
        @raise ConfigError: a setting this provider requires is not set.
        """
        for setting in self.required_settings:
            if not getattr(config, setting):
                raise ConfigError(
                    setting.replace("_", "-"), f"required with --provider-type {self.name}"
                )


def watch_resource(
    provider: Provider, config: IngressConfig, registry: SandboxRegistry, reactor: Any
) -> IService:
    """Build a L{KubernetesSource} for the row's C{kind}."""
    # Imported here: the Kubernetes client is heavy and only these rows use it.
    from .kube_setup import build_kubernetes_source

    if provider.kind is None:
        raise ValueError(f"provider {provider.name!r} has no resource kind to watch")
    return build_kubernetes_source(config, registry, reactor, kind=provider.kind)


def read_file(
    provider: Provider, config: IngressConfig, registry: SandboxRegistry, reactor: Any
) -> IService:
    """Build a L{FileSource} for C{--sandboxes-file}."""
    from .file import FileSource

    assert config.sandboxes_file is not None  # a required setting of the row
    return FileSource(reactor, registry, config.sandboxes_file)


#: Every provider, in the order C{--help} lists them.
PROVIDERS: tuple[Provider, ...] = (
    Provider("batchsandbox", watch_resource, kind=BATCHSANDBOX_KIND),
    Provider(
        "agent-sandbox",
        watch_resource,
        kind=AGENTSANDBOX_KIND,
        name_candidates=agentsandbox.name_candidates,
    ),
    Provider("file", read_file, required_settings=("sandboxes_file",)),
)

#: The C{--provider-type} used when none is given.
DEFAULT_PROVIDER = "batchsandbox"


def provider_names() -> tuple[str, ...]:
    """The C{--provider-type} choices, in table order."""
    return tuple(row.name for row in PROVIDERS)


def describe_choices() -> str:
    """The choices as prose for C{--help}: C{a, b or c}."""
    names = provider_names()
    if len(names) < 2:
        return "".join(names)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def provider_named(name: str) -> Provider:
    """
    The row called C{name}.

    @raise ConfigError: no such row (the message lists the choices).
    """
    for row in PROVIDERS:
        if row.name == name:
            return row
    raise ConfigError(
        "provider-type",
        f"unknown provider {name!r}; expected one of {', '.join(provider_names())}",
    )


def name_candidates_for(config: IngressConfig) -> Callable[[str], Sequence[str]]:
    """The registry's sandbox-id-to-resource-names mapping for a provider."""
    return provider_named(config.provider_type).name_candidates


def build_source(config: IngressConfig, registry: SandboxRegistry, reactor: Any) -> IService:
    """Build the source service that C{config.provider_type} names."""
    provider = provider_named(config.provider_type)
    return provider.build_source(provider, config, registry, reactor)
