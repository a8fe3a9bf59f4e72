"""
Shared helpers for the Kubernetes source tests: resource builders, a client
for the fake API server, and a deadline-bounded condition wait (tests never
sleep for a fixed time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient, Configuration
from twisted.internet import reactor
from twisted.internet.task import deferLater

POLL_INTERVAL_S = 0.01


async def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """
    Poll C{condition} on the reactor thread until it is true; fail the test
    after C{timeout} seconds.  Polling yields to the reactor, so events
    handed over with C{callFromThread} get applied meanwhile.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await deferLater(reactor, POLL_INTERVAL_S, lambda: None)


def api_client_for(url: str) -> ApiClient:
    """A client for the fake API server, built like the real loader does."""
    configuration = Configuration(host=url)
    configuration.retries = 0
    return ApiClient(configuration)


def batchsandbox(
    name: str,
    namespace: str = "opensandbox",
    *,
    ready: Any = 1,
    endpoints: Any = ("10.0.0.1",),
    token: str | None = None,
    raw_endpoints: str | None = None,
    uid: str | None = None,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """A BatchSandbox object shaped like examples/batchsandbox.yaml."""
    annotations: dict[str, Any] = {}
    if raw_endpoints is not None:
        annotations["sandbox.opensandbox.io/endpoints"] = raw_endpoints
    elif endpoints is not None:
        annotations["sandbox.opensandbox.io/endpoints"] = json.dumps(list(endpoints))
    if token is not None:
        annotations["opensandbox.io/secure-access-token"] = token
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": annotations}
    if uid is not None:
        metadata["uid"] = uid
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    obj: dict[str, Any] = {
        "apiVersion": "sandbox.opensandbox.io/v1alpha1",
        "kind": "BatchSandbox",
        "metadata": metadata,
        "spec": {"replicas": 1},
        "status": {"replicas": 1, "allocated": 1},
    }
    if ready is not None:
        obj["status"]["ready"] = ready
    return obj


def agentsandbox(
    name: str,
    namespace: str = "opensandbox",
    *,
    ready: str | None = "True",
    fqdn: str | None = "",
    token: str | None = None,
) -> dict[str, Any]:
    """An agent-sandbox Sandbox shaped like examples/agentsandbox.yaml."""
    status: dict[str, Any] = {}
    if fqdn is not None:
        status["serviceFQDN"] = fqdn or f"{name}.{namespace}.svc.cluster.local"
    if ready is not None:
        status["conditions"] = [
            {"type": "Ready", "status": ready, "reason": "DependenciesReady", "message": "ok"}
        ]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if token is not None:
        metadata["annotations"] = {"opensandbox.io/secure-access-token": token}
    return {
        "apiVersion": "agents.x-k8s.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": metadata,
        "status": status,
    }


def write_kubeconfig(path: Any, server: str, token: str = "e2e-token") -> Any:
    """
    Write a one-context kubeconfig for C{server} (the fake API's URL) that
    authenticates with a bearer C{token}; returns C{path}.
    """
    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "ingress", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ingress"}}],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(config))
    return path
