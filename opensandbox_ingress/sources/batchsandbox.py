"""
BatchSandbox resources (C{sandbox.opensandbox.io/v1alpha1}, plural
C{batchsandboxes}) as registry records: SPEC section 4.1.

Pure: no reactor, no client, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..registry import SandboxRecord
from ._kube_objects import (
    MalformedObject,
    ResourceKind,
    object_annotations,
    object_generation,
    object_key,
    object_uid,
    secure_access_token,
)

GROUP = "sandbox.opensandbox.io"
VERSION = "v1alpha1"
PLURAL = "batchsandboxes"

#: JSON array of endpoint hosts (pod IPs) written by the controller; the
#: first one is where requests go.
ENDPOINTS_ANNOTATION = "sandbox.opensandbox.io/endpoints"

# Characters that cannot appear in a host that we paste into
# http://{host}:{port}/...; an endpoint containing one would let a
# resource steer requests to a different URL.
_NOT_IN_HOST = frozenset(" \t\r\n/\\?#@")


def _ready_problem(obj: Mapping[str, Any]) -> str | None:
    status = obj.get("status")
    if status is None:
        return "status.ready is missing, needs >= 1"
    if not isinstance(status, Mapping):
        return "status is not an object"
    ready = status.get("ready")
    if ready is None:
        return "status.ready is missing, needs >= 1"
    # bool is an int in Python; JSON true is not a replica count.
    if isinstance(ready, bool) or not isinstance(ready, int):
        return "status.ready is not an integer"
    if ready < 1:
        return f"status.ready is {ready}, needs >= 1"
    return None


def parse_endpoints(annotations: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """
    Read the endpoints annotation.

    @return: C{(endpoint, None)} with the first endpoint, or
        C{(None, problem)} saying exactly what is missing or invalid.
    """
    where = f"annotation {ENDPOINTS_ANNOTATION}"
    raw = annotations.get(ENDPOINTS_ANNOTATION)
    if raw is None:
        return None, f"{where} is missing"
    if not isinstance(raw, str):
        return None, f"{where} is not a string"
    if not raw.strip():
        return None, f"{where} is empty"
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None, f"{where} is not valid JSON"
    # Like upstream's json.Unmarshal into []string: every element a string.
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None, f"{where} is not a JSON array of strings"
    if not value:
        return None, f"{where} is an empty array"
    endpoint = value[0].strip()
    if not endpoint:
        return None, f"{where}: first endpoint is empty"
    if any(c in _NOT_IN_HOST for c in endpoint):
        return None, f"{where}: first endpoint is not a valid host"
    return endpoint, None


def record_from_batchsandbox(obj: Mapping[str, Any]) -> SandboxRecord:
    """
    Convert one BatchSandbox object to a L{SandboxRecord}.

    Ready when C{status.ready >= 1} and the endpoints annotation is a JSON
    array of at least one string; the endpoint is its first element.
    Otherwise the record is not ready and C{not_ready_reason} lists every
    problem found, for the 503 body.  The endpoint is kept when it parses
    even if the sandbox is not ready yet (the routing view shows it).

    @raise MalformedObject: unusable metadata (see L{object_key}); the
        caller skips the object.
    """
    namespace, name = object_key(obj)
    annotations = object_annotations(obj)
    token = secure_access_token(obj)
    generation = object_generation(obj)
    problems: list[str] = []
    ready_problem = _ready_problem(obj)
    if ready_problem:
        problems.append(ready_problem)
    endpoint, endpoint_problem = parse_endpoints(annotations)
    if endpoint_problem:
        problems.append(endpoint_problem)
    return SandboxRecord(
        name=name,
        namespace=namespace,
        endpoint=endpoint,
        ready=not problems,
        not_ready_reason="; ".join(problems),
        secure_access_token=token,
        generation=generation,
        incarnation=object_uid(obj),
    )


#: What L{opensandbox_ingress.sources.kubernetes.KubernetesSource} watches
#: for C{--provider-type batchsandbox}.
BATCHSANDBOX_KIND = ResourceKind(GROUP, VERSION, PLURAL, record_from_batchsandbox)

__all__ = [
    "BATCHSANDBOX_KIND",
    "ENDPOINTS_ANNOTATION",
    "GROUP",
    "MalformedObject",
    "PLURAL",
    "VERSION",
    "parse_endpoints",
    "record_from_batchsandbox",
]
