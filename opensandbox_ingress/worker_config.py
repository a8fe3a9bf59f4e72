"""
The worker's configuration over a pipe: L{IngressConfig} to JSON and back.

The supervisor writes it as one line on each worker's stdin (never argv or
the environment: it may carry secrets); the worker decodes and validates
it.  Bytes travel as base64, tuples as lists.
"""

from __future__ import annotations

import base64
from dataclasses import fields, is_dataclass
from typing import Any

from .config import IngressConfig


def config_to_json(config: IngressConfig) -> Any:
    """A JSON-friendly form of C{config} (bytes as base64, tuples as lists)."""
    return _encode(config)


def config_from_json(data: Any) -> IngressConfig:
    """The inverse of L{config_to_json}; the result is validated."""
    return _decode_dataclass(IngressConfig, data).validate()


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot pass a {type(value).__name__} to a worker process")


def _decode_dataclass(cls: Any, data: dict[str, Any]) -> Any:
    defaults = cls()
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            default = getattr(defaults, f.name)
            if is_dataclass(default):
                kwargs[f.name] = _decode_dataclass(type(default), data[f.name])
            else:
                kwargs[f.name] = _decode(data[f.name])
    return cls(**kwargs)


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value
