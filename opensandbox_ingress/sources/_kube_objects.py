"""
Reading Kubernetes objects safely: the shared, pure part of the resource
converters.

The watch hands over objects exactly as the API server sent them (decoded
JSON).  Anything can be missing or of the wrong type, so every accessor here
checks what it reads and raises L{MalformedObject} for metadata that cannot be
trusted; the source skips such objects with one log line instead of crashing
its loop.  Messages never include annotation values (one of them is a secret).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..registry import SandboxRecord

#: OSEP-0011: a sandbox whose resource carries this annotation with a
#: non-empty (trimmed) value requires secure access (SPEC section 3).
SECURE_ACCESS_TOKEN_ANNOTATION = "opensandbox.io/secure-access-token"


class MalformedObject(ValueError):
    """
    An object from the API lacks metadata the ingress needs, or has it with
    the wrong type.  C{str(error)} is one line that names the field.
    """


@dataclass(frozen=True)
class ResourceKind:
    """
    One custom resource type that a L{KubernetesSource} lists and watches.

    @ivar group: API group, for example C{sandbox.opensandbox.io}.
    @ivar version: API version, for example C{v1alpha1}.
    @ivar plural: Resource plural, for example C{batchsandboxes}.
    @ivar to_record: Pure conversion of one object to a record; raises
        L{MalformedObject} for objects that must be skipped.
    """

    group: str
    version: str
    plural: str
    to_record: Callable[[Mapping[str, Any]], SandboxRecord]

    @property
    def description(self) -> str:
        """C{plural.group/version}, for log lines."""
        return f"{self.plural}.{self.group}/{self.version}"


def object_metadata(obj: object) -> Mapping[str, Any]:
    """Return C{obj["metadata"]}, checking that both are JSON objects."""
    if not isinstance(obj, Mapping):
        raise MalformedObject(f"object is a {type(obj).__name__}, not a JSON object")
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise MalformedObject("metadata is missing or not an object")
    return metadata


def _optional_str(metadata: Mapping[str, Any], field: str) -> str:
    value = metadata.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedObject(f"metadata.{field} is not a string")
    return value


def object_key(obj: object) -> tuple[str, str]:
    """
    The registry key of an object: C{(namespace, name)}.

    @raise MalformedObject: no usable C{metadata.name}, or a namespace that
        is not a string.
    """
    metadata = object_metadata(obj)
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedObject("metadata.name is missing or not a non-empty string")
    return (_optional_str(metadata, "namespace"), name)


def object_generation(obj: object) -> str:
    """
    C{"{uid}/{resourceVersion}"}: the identity of this incarnation of the
    object, which changes whenever the object does (SPEC section 10).
    """
    metadata = object_metadata(obj)
    uid = _optional_str(metadata, "uid")
    resource_version = _optional_str(metadata, "resourceVersion")
    return f"{uid}/{resource_version}"


def object_uid(obj: object) -> str:
    """C{metadata.uid}: the same for the object's whole life, new if it is recreated."""
    return _optional_str(object_metadata(obj), "uid")


def object_annotations(obj: object) -> Mapping[str, Any]:
    """C{metadata.annotations}, or an empty mapping when there are none."""
    annotations = object_metadata(obj).get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, Mapping):
        raise MalformedObject("metadata.annotations is not an object")
    return annotations


def secure_access_token(obj: object) -> str | None:
    """
    The trimmed OSEP-0011 access token, or C{None} when the annotation is
    absent or blank.

    @raise MalformedObject: the annotation is present but not a string.  The
        object is skipped rather than served without its credential.
    """
    value = object_annotations(obj).get(SECURE_ACCESS_TOKEN_ANNOTATION)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedObject(f"annotation {SECURE_ACCESS_TOKEN_ANNOTATION} is not a string")
    return value.strip() or None


def object_resource_version(obj: object) -> str | None:
    """
    C{metadata.resourceVersion} when it is a non-empty string, else C{None}.
    Never raises: the watch loop uses it to remember how far it has read,
    even for objects it will skip.
    """
    if not isinstance(obj, Mapping):
        return None
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        return None
    value = metadata.get("resourceVersion")
    if isinstance(value, str) and value:
        return value
    return None


def describe_object(obj: object) -> str:
    """C{namespace/name} when readable, for log lines; never raises."""
    try:
        namespace, name = object_key(obj)
    except MalformedObject:
        return "<unnamed object>"
    return f"{namespace}/{name}" if namespace else name
