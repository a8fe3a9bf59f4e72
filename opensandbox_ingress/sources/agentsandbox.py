"""
agent-sandbox C{Sandbox} resources (C{agents.x-k8s.io/v1alpha1}, plural
C{sandboxes}) as registry records, and the sandbox-id-to-name mapping:
SPEC section 4.2.

Pure: no reactor, no client, no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from ..registry import SandboxRecord
from ._kube_objects import (
    MalformedObject,
    ResourceKind,
    object_generation,
    object_key,
    object_uid,
    secure_access_token,
)

GROUP = "agents.x-k8s.io"
VERSION = "v1alpha1"
PLURAL = "sandboxes"

READY_CONDITION = "Ready"
NAME_PREFIX = "sandbox"
DNS1035_MAX_LENGTH = 63

_INVALID_RUN = re.compile(r"[^a-z0-9-]+")
_HYPHEN_RUN = re.compile(r"-+")
# A condition message is controller prose; keep 503 bodies short.
_MAX_MESSAGE = 200


def _starts_with_letter(value: str) -> bool:
    return bool(value) and "a" <= value[0] <= "z"


def dns1035_name(sandbox_id: str) -> str:
    """
    The resource name the OpenSandbox server gives the Sandbox of a
    sandbox id (SPEC 4.2, same algorithm as the server's
    C{_to_dns1035_label}; note that upstream's Go ingress hashes with SHA-1
    instead, which disagrees with the server for long or odd ids).

    Lower-case and trim; replace each run of characters outside
    C{[a-z0-9-]} by C{-}; collapse runs of C{-}; trim C{-}; the suffix is
    the first 8 hex digits of sha256(original id); empty -> C{sandbox-{suffix}};
    not starting with a letter -> prefix C{sandbox-}; longer than 63 -> cut to
    54 characters, trim C{-}, use C{sandbox} if it no longer starts with a
    letter, append C{-{suffix}}; trim C{-}.
    """
    normalized = _INVALID_RUN.sub("-", sandbox_id.strip().lower())
    normalized = _HYPHEN_RUN.sub("-", normalized).strip("-")
    # surrogatepass: an id decoded with surrogateescape must not crash lookup.
    suffix = hashlib.sha256(sandbox_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not normalized:
        normalized = f"{NAME_PREFIX}-{suffix}"
    elif not _starts_with_letter(normalized):
        normalized = f"{NAME_PREFIX}-{normalized}"
    if len(normalized) > DNS1035_MAX_LENGTH:
        base = normalized[: DNS1035_MAX_LENGTH - len(suffix) - 1].strip("-")
        if not _starts_with_letter(base):
            base = NAME_PREFIX
        normalized = f"{base}-{suffix}"
    return normalized.strip("-")


def name_candidates(sandbox_id: str) -> list[str]:
    """
    Resource names to try, in order, for a sandbox id: (a) its DNS-1035
    form, (b) the id itself, (c) C{sandbox-{id}} unless the id already
    starts with C{sandbox-}.  Duplicates and the empty name (no resource
    can have it) are left out.
    """
    candidates: list[str] = []
    legacy = sandbox_id if sandbox_id.startswith("sandbox-") else f"sandbox-{sandbox_id}"
    for name in (dns1035_name(sandbox_id), sandbox_id, legacy):
        if name and name not in candidates:
            candidates.append(name)
    return candidates


def _ready_condition_problem(status: Mapping[str, Any]) -> str | None:
    conditions = status.get("conditions")
    if conditions is None:
        return "status.conditions is missing"
    if not isinstance(conditions, list):
        return "status.conditions is not a list"
    for condition in conditions:
        if not isinstance(condition, Mapping):
            continue
        if condition.get("type") != READY_CONDITION:
            continue
        state = condition.get("status")
        if state == "True":
            return None
        detail = condition.get("reason")
        message = condition.get("message")
        text = f"condition Ready is {state if isinstance(state, str) else 'unknown'}"
        if isinstance(detail, str) and detail:
            text += f" ({detail}"
            if isinstance(message, str) and message:
                text += f": {' '.join(message.split())[:_MAX_MESSAGE]}"
            text += ")"
        return text
    return "condition Ready is missing"


def record_from_agentsandbox(obj: Mapping[str, Any]) -> SandboxRecord:
    """
    Convert one agent-sandbox C{Sandbox} object to a L{SandboxRecord}.

    Ready when C{status.conditions} has C{type: Ready, status: "True"} and
    C{status.serviceFQDN} is non-empty; the endpoint is that FQDN.
    Otherwise the record is not ready and C{not_ready_reason} says why.

    @raise MalformedObject: unusable metadata; the caller skips the object.
    """
    namespace, name = object_key(obj)
    token = secure_access_token(obj)
    generation = object_generation(obj)
    problems: list[str] = []
    endpoint: str | None = None
    status = obj.get("status")
    if status is None:
        problems.append("status is missing")
    elif not isinstance(status, Mapping):
        problems.append("status is not an object")
    else:
        condition_problem = _ready_condition_problem(status)
        if condition_problem:
            problems.append(condition_problem)
        fqdn = status.get("serviceFQDN")
        if isinstance(fqdn, str) and fqdn.strip():
            endpoint = fqdn.strip()
        else:
            problems.append("status.serviceFQDN is empty")
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
#: for C{--provider-type agent-sandbox}.
AGENTSANDBOX_KIND = ResourceKind(GROUP, VERSION, PLURAL, record_from_agentsandbox)

__all__ = [
    "AGENTSANDBOX_KIND",
    "GROUP",
    "MalformedObject",
    "PLURAL",
    "VERSION",
    "dns1035_name",
    "name_candidates",
    "record_from_agentsandbox",
]
