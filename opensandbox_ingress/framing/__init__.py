"""
HTTP/1.1 framing, sans-IO: bytes in, events out, and the ingress's policy
on top.  Nothing here imports Twisted.
"""

from ._policy import (
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_RESPONSE_HEAD_BYTES,
    invalid_response_header,
    reason_phrase,
    standard_reason,
    status_line,
    valid_field_name,
    valid_field_value,
    valid_status,
)

__all__ = [
    "MAX_HEAD_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_RESPONSE_HEAD_BYTES",
    "invalid_response_header",
    "reason_phrase",
    "standard_reason",
    "status_line",
    "valid_field_name",
    "valid_field_value",
    "valid_status",
]
