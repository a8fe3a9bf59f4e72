"""
Building the Kubernetes source from the configuration, and the environment
knobs that tune its timings (defaults in
L{opensandbox_ingress.sources.kubernetes}).

Environment knobs, read by L{build_kubernetes_source} (for tests and for
operators who need to tune them; there are no flags for them):

  - C{OPENSANDBOX_INGRESS_WATCH_TIMEOUT_S}: whole seconds >= 1,
    C{timeoutSeconds} of each watch request (default L{WATCH_TIMEOUT_S}).
  - C{OPENSANDBOX_INGRESS_REQUEST_TIMEOUT_S}: seconds > 0 a list may stay
    silent, and a watch beyond its C{timeoutSeconds}, before its connection
    is declared dead (default L{REQUEST_TIMEOUT_S}).  A stalled watch stream
    is thus detected after C{WATCH_TIMEOUT_S + REQUEST_TIMEOUT_S} of silence.
  - C{OPENSANDBOX_INGRESS_BACKOFF_BASE_S} and
    C{OPENSANDBOX_INGRESS_BACKOFF_CAP_S}: seconds > 0, first and largest
    retry delay after failures (defaults L{BACKOFF_BASE_S},
    L{BACKOFF_CAP_S}); the cap must not be below the base.

A bad value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import IService

from .. import buildinfo
from ..config_error import ConfigError
from ..registry import SandboxRegistry
from ._kube_objects import ResourceKind
from .kubeconfig import load_api_client
from .kubernetes import BACKOFF_BASE_S, BACKOFF_CAP_S, KubernetesSource

if TYPE_CHECKING:
    from ..config import IngressConfig

WATCH_TIMEOUT_ENV = "OPENSANDBOX_INGRESS_WATCH_TIMEOUT_S"
REQUEST_TIMEOUT_ENV = "OPENSANDBOX_INGRESS_REQUEST_TIMEOUT_S"
BACKOFF_BASE_ENV = "OPENSANDBOX_INGRESS_BACKOFF_BASE_S"
BACKOFF_CAP_ENV = "OPENSANDBOX_INGRESS_BACKOFF_CAP_S"


class EnvironmentConfigError(ConfigError):
    """
    A L{ConfigError} about an environment variable rather than a flag:
    C{str(error)} starts with the variable's name instead of C{--flag}.
    """

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.args = (f"{variable}: {problem}",)

    def __str__(self) -> str:
        return str(self.args[0])


def _env_seconds(text: str, variable: str, *, whole: bool) -> float:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number of seconds" if whole else "a number of seconds"
        raise EnvironmentConfigError(variable, f"{text!r} is not {kind}") from None
    if not (value > 0 and math.isfinite(value)) or (whole and value < 1):
        raise EnvironmentConfigError(variable, f"{text!r} must be a finite number > 0")
    return value


def watch_settings_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """
    The L{KubernetesSource} timing keywords set by the environment knobs
    described in this module's docstring; knobs left unset are left out.

    @raise ConfigError: a knob is set to something unusable (one line
        naming the variable).
    """
    settings: dict[str, Any] = {}
    for variable, keyword, whole in (
        (WATCH_TIMEOUT_ENV, "watch_timeout_s", True),
        (REQUEST_TIMEOUT_ENV, "request_timeout_s", False),
        (BACKOFF_BASE_ENV, "backoff_base_s", False),
        (BACKOFF_CAP_ENV, "backoff_cap_s", False),
    ):
        text = environ.get(variable, "").strip()
        if text:
            settings[keyword] = _env_seconds(text, variable, whole=whole)
    base = settings.get("backoff_base_s", BACKOFF_BASE_S)
    cap = settings.get("backoff_cap_s", BACKOFF_CAP_S)
    if cap < base:
        variable = BACKOFF_CAP_ENV if "backoff_cap_s" in settings else BACKOFF_BASE_ENV
        raise EnvironmentConfigError(
            variable, f"backoff cap {cap:g}s is below the backoff base {base:g}s"
        )
    return settings


def user_agent() -> str:
    """
    The C{User-Agent} of every request to the API server:
    C{opensandbox-ingress/<build version>}, so audit logs tell the ingress
    apart from other clients (the client's default is the generic
    C{OpenAPI-Generator/...}).
    """
    return f"opensandbox-ingress/{buildinfo.current().version}"


def build_kubernetes_source(
    config: IngressConfig,
    registry: SandboxRegistry,
    reactor: Any,
    environ: Mapping[str, str] = os.environ,
    *,
    kind: ResourceKind,
) -> IService:
    """
    Build the source that watches C{kind} (a row of the provider table):
    C{--namespace} or C{--all-namespaces}, C{--kubeconfig}, C{--context},
    and the environment knobs of this module's docstring.

    The client configuration is loaded now, so a broken one stops start-up.

    @param environ: Where to read the knobs (tests pass their own).
    @raise ConfigError: the Kubernetes configuration or a knob is unusable.
    """
    settings = watch_settings_from_env(environ)
    api_client = load_api_client(config.kubeconfig, config.context)
    api_client.user_agent = user_agent()
    source = KubernetesSource(
        reactor,
        registry,
        kind,
        None if config.all_namespaces else config.namespace,
        api_client,
        **settings,
    )
    # Service is declared with @implementer(IService); say so to mypy,
    # which does not read zope declarations.
    return cast(IService, source)
