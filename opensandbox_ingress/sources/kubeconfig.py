"""
Kubernetes client configuration for the watch sources (SPEC section 5).

Order, the Go ingress's (knative's C{injection.ParseAndGetRESTConfigOrDie},
whose C{--kubeconfig} defaults to C{$KUBECONFIG}):

1. an explicit C{--kubeconfig};
2. C{$KUBECONFIG} when set and non-empty (it may list several files, merged
   as C{kubectl} does);
3. the in-cluster service account, when the process runs in a pod and no
   C{--context} was given (a context names a kubeconfig entry, so it always
   selects a kubeconfig);
4. C{~/.kube/config}.

So a pod that sets C{KUBECONFIG} on purpose (to reach another cluster, or
with a token of its own) gets that configuration, not its service account.

Each call builds a fresh C{Configuration} and C{ApiClient}: the client's
process-wide default configuration is never read nor mutated, so two
ingresses (or an embedding program with its own client) coexist.  Every
failure is a L{ConfigError} whose text is one line naming the flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kubernetes.client import ApiClient, Configuration
from kubernetes.config.incluster_config import (
    SERVICE_HOST_ENV_NAME,
    InClusterConfigLoader,
)
from kubernetes.config.kube_config import (
    ENV_KUBECONFIG_PATH_SEPARATOR,
    KubeConfigMerger,
    load_kube_config,
)

from ..config_error import ConfigError

#: Where Kubernetes mounts a pod's service account.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"
# Keep start-up errors to one readable line.
_MAX_ERROR = 300


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:_MAX_ERROR]


def _new_configuration() -> Configuration:
    configuration = Configuration()
    # The watch loop owns retries (with backoff and re-list); urllib3's own
    # silent retries would only hide failures and delay shutdown.
    configuration.retries = 0
    return configuration


def in_cluster(
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> bool:
    """Whether a pod's service account is available."""
    return bool(environ.get(SERVICE_HOST_ENV_NAME)) and os.path.isfile(
        os.path.join(service_account_dir, "token")
    )


def _load_in_cluster(environ: Mapping[str, str], service_account_dir: str) -> ApiClient:
    configuration = _new_configuration()
    try:
        # try_refresh_token: bound service account tokens rotate; the hook
        # re-reads the file (in the watch thread) before it expires.
        InClusterConfigLoader(
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
            try_refresh_token=True,
            environ=environ,
        ).load_and_set(configuration)
    except Exception as e:
        raise ConfigError(
            "kubeconfig",
            f"in-cluster service account ({service_account_dir}) is unusable: {_one_line(e)}",
        ) from None
    return ApiClient(configuration)


def _context_names(path: str) -> tuple[list[str], str | None]:
    merged = KubeConfigMerger(path).config
    if merged is None:
        raise ValueError("no configuration found")
    value = merged.value
    names: list[str] = []
    for context in value.get("contexts") or []:
        # The merger wraps each entry in a ConfigNode that remembers its file.
        entry = getattr(context, "value", context)
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            names.append(entry["name"])
    current = value.get("current-context")
    return names, current if isinstance(current, str) and current else None


def _load_kubeconfig(path: str, context: str | None, missing: str) -> ApiClient:
    """
    Load the kubeconfig file(s) C{path}; C{missing} is the one-line
    reason given when none of its files exists.
    """
    files = [os.path.expanduser(p) for p in path.split(ENV_KUBECONFIG_PATH_SEPARATOR) if p]
    if not any(os.path.exists(f) for f in files):
        raise ConfigError("kubeconfig", missing)
    try:
        names, current = _context_names(path)
    except Exception as e:
        raise ConfigError("kubeconfig", f"{path}: invalid kubeconfig: {_one_line(e)}") from None
    known = ", ".join(names) or "none"
    if context is not None and context not in names:
        raise ConfigError("context", f"context {context!r} not in {path} (known: {known})")
    if context is None and current is None:
        raise ConfigError(
            "kubeconfig", f"{path} has no current-context; pass --context (known: {known})"
        )
    configuration = _new_configuration()
    try:
        # persist_config=False: never rewrite the operator's kubeconfig.
        load_kube_config(
            config_file=path,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except Exception as e:
        raise ConfigError(
            "kubeconfig",
            f"{path} (context {context or current!r}) is unusable: {_one_line(e)}",
        ) from None
    return ApiClient(configuration)


def load_api_client(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    default_kubeconfig: str = DEFAULT_KUBECONFIG,
) -> ApiClient:
    """
    Build a new C{ApiClient} for one source, from the first of: C{--kubeconfig},
    C{$KUBECONFIG}, the in-cluster service account (unless C{--context}
    was given), C{~/.kube/config}.

    @param kubeconfig: C{--kubeconfig}: a kubeconfig path (or several,
        separated like C{$KUBECONFIG}); wins over everything else.
    @param context: C{--context}: the kubeconfig context to use instead of
        its C{current-context}; it applies to whichever kubeconfig is used
        and rules out the in-cluster account, which has no contexts.
    @param environ: Where to read C{KUBECONFIG} and
        C{KUBERNETES_SERVICE_HOST/PORT} (tests pass their own).
    @param service_account_dir: Where the pod's token and CA live.
    @param default_kubeconfig: The last resort (tests pass their own).
    @raise ConfigError: configuration missing, unreadable or invalid.
    """
    if kubeconfig is not None:
        return _load_kubeconfig(kubeconfig, context, f"{kubeconfig}: no such file")
    # Empty counts as unset, as in client-go's loading rules.
    from_env = environ.get("KUBECONFIG")
    if from_env:
        return _load_kubeconfig(from_env, context, f"$KUBECONFIG ({from_env}): no such file")
    if context is None and in_cluster(environ, service_account_dir):
        return _load_in_cluster(environ, service_account_dir)
    if context is not None:
        missing = (
            f"--context given but $KUBECONFIG is unset and {default_kubeconfig} does not exist"
        )
    else:
        missing = (
            f"no Kubernetes configuration: $KUBECONFIG unset, not running in a pod "
            f"({SERVICE_HOST_ENV_NAME} unset or no service account token) "
            f"and {default_kubeconfig} does not exist"
        )
    return _load_kubeconfig(default_kubeconfig, context, missing)
