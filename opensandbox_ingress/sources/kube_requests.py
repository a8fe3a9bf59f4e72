"""
The blocking half of the Kubernetes source: list and watch requests, run in
the source's own thread, and the conversion of what they return.

L{KubeRequests} performs one request at a time with the official
C{kubernetes} client and converts objects to records (pure functions) on
the way, so the reactor thread only swaps records in.  What it produces
crosses to the reactor thread whole: a L{Listing} as the result of the
thread call, each watch event as a L{Change} posted with C{callFromThread}.
L{opensandbox_ingress.sources.kubernetes.KubernetesSource} owns an instance
and decides what to request next.

Any thread may call L{KubeRequests.abort_in_flight}; every other method
runs in the watch thread.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ..registry import SandboxRecord
from ._kube_objects import (
    MalformedObject,
    ResourceKind,
    describe_object,
    object_key,
    object_resource_version,
)

# Restart reasons, as counted in SourceStats.restarts and logged.
GONE = "gone"  # 410: the version is too old; list again
CLOSED = "closed"  # the server ended the stream; watch again
DROPPED = "dropped"  # the connection broke mid-stream; back off, watch again
ERROR = "error"  # a request failed; back off, retry the same step
STOPPED = "stopped"  # the source is stopping; not counted


class Stopping(Exception):
    """The source is stopping; the request in flight is abandoned."""


@dataclass(frozen=True)
class Skipped:
    """An object left out as malformed, to be counted and logged."""

    what: str
    obj: str
    error: str


@dataclass(frozen=True)
class Listing:
    """A whole list, converted in the watch thread, to apply at once."""

    records: list[SandboxRecord]
    skipped: list[Skipped]
    resource_version: str


@dataclass(frozen=True)
class Change:
    """
    One ADDED/MODIFIED/DELETED event, converted in the watch thread.
    C{key} is C{None} when the object's metadata is unusable (nothing to
    apply); C{record} is C{None} to remove C{key}.
    """

    event_type: str
    key: tuple[str, str] | None
    record: SandboxRecord | None
    resource_version: str | None
    skipped: Skipped | None = None


@dataclass(frozen=True)
class WatchEnd:
    """
    How one watch request ended: a restart reason, the last version seen,
    how many events it delivered, and one line for the log.
    """

    reason: str
    resource_version: str
    events: int
    detail: str = ""


def describe_error(error: BaseException) -> str:
    """One line about a failure; never the response body or headers."""
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason or ''}".strip()
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _iter_lines(response: Any) -> Iterator[bytes]:
    """
    The non-blank lines of a watch stream, each yielded as soon as it is
    complete.  C{stream(amt=None)} yields each HTTP chunk as it arrives
    (the API server sends watch events chunked).
    """
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=True):
        buffer.extend(chunk)
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            if line.strip():
                yield line
        del buffer[:start]
    if bytes(buffer).strip():
        yield bytes(buffer)


def abort(response: Any) -> None:
    """
    Unblock a thread reading C{response}, from another thread.  Closing a
    socket does not wake a blocked C{recv}; shutting it down does.
    """
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        else:
            response.shutdown()
    except Exception:
        pass  # Already closed or released: nothing left to unblock.


@dataclass(frozen=True)
class WatchHandlers:
    """
    Where a watch delivers, on the reactor thread: each converted change,
    each bookmark's version, and each line skipped (with its reason).
    """

    apply_change: Callable[[Change], None]
    note_bookmark: Callable[[str], None]
    skip_line: Callable[[str], None]


class BlockingRequests(Protocol):
    """
    What L{KubernetesSource} needs from its blocking half: L{KubeRequests}
    against an API server, or a scripted stand-in in tests that drive the
    loop's timers with a fake clock.
    """

    def abort_in_flight(self) -> None:
        """Unblock the request being read, if any."""

    def list_blocking(self, stop: threading.Event) -> Listing:
        """List every object, converted."""

    def watch_blocking(
        self,
        stop: threading.Event,
        resource_version: str,
        handlers: WatchHandlers,
        post: Callable[..., None],
    ) -> WatchEnd:
        """Watch until the stream ends, posting each event to C{handlers}."""


class KubeRequests:
    """
    List and watch requests for one resource kind in one scope.

    Ownership: the watch thread, except L{abort_in_flight}.  The response
    being read is shared with the thread that stops the source: C{_lock}
    orders "publish the response" against "set the stop flag, then abort
    what is published".  Each run of the source passes its own stop
    C{Event}, so a thread left over from an earlier run never sees a fresh
    flag.
    """

    def __init__(
        self,
        api_client: ApiClient,
        kind: ResourceKind,
        namespace: str | None,
        *,
        watch_timeout_s: int,
        connect_timeout_s: float,
        request_timeout_s: float,
    ) -> None:
        """
        @param api_client: The client to request with (not closed here).
        @param kind: The resource to list and watch, and its converter.
        @param namespace: The namespace, or C{None} for every namespace.
        @param watch_timeout_s: C{timeoutSeconds} of each watch request.
        @param connect_timeout_s: Seconds to connect to the API server.
        @param request_timeout_s: Seconds a list may stay silent, and a
            watch beyond C{watch_timeout_s}.
        """
        self._api = CustomObjectsApi(api_client)
        self._kind = kind
        self._namespace = namespace
        self._watch_timeout_s = int(watch_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._active_response: Any = None

    def abort_in_flight(self) -> None:
        """
        Unblock the request being read, if any (from any thread); call it
        after setting the run's stop flag.
        """
        with self._lock:
            response = self._active_response
        if response is not None:
            abort(response)

    def _request(self, **kwargs: Any) -> Any:
        """One list or watch call; returns the unread urllib3 response."""
        kind = self._kind
        # _preload_content=False: we read the body ourselves, so that the
        # response object exists while we block on it and can be aborted.
        if self._namespace is None:
            return self._api.list_cluster_custom_object(
                kind.group, kind.version, kind.plural, _preload_content=False, **kwargs
            )
        return self._api.list_namespaced_custom_object(
            kind.group,
            kind.version,
            self._namespace,
            kind.plural,
            _preload_content=False,
            **kwargs,
        )

    def _publish(self, response: Any, stop: threading.Event) -> bool:
        """Make C{response} abortable; C{False} if we are stopping already."""
        with self._lock:
            if stop.is_set():
                return False
            self._active_response = response
            return True

    def _release(self, response: Any) -> None:
        with self._lock:
            if self._active_response is response:
                self._active_response = None
        try:
            response.close()
            response.release_conn()
        except Exception:
            pass

    def list_blocking(self, stop: threading.Event) -> Listing:
        """
        List every object (watch thread); the result is converted already.

        @raise Stopping: C{stop} was set meanwhile.
        @raise Exception: the request or its body failed.
        """
        response = self._request(
            _request_timeout=(self._connect_timeout_s, self._request_timeout_s)
        )
        try:
            if not self._publish(response, stop):
                raise Stopping()
            body = json.loads(response.data)
        finally:
            self._release(response)
        if not isinstance(body, dict):
            raise ValueError("list response is not a JSON object")
        items = body.get("items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise ValueError("list response items is not a list")
        version = object_resource_version(body)
        if version is None:
            raise ValueError("list response has no metadata.resourceVersion")
        del body
        return self._convert_listing(items, version, stop)

    # -- converting (watch thread; pure) ----------------------------------------

    def _to_record(self, what: str, obj: Any) -> tuple[SandboxRecord | None, Skipped | None]:
        try:
            return self._kind.to_record(obj), None
        except MalformedObject as e:
            return None, Skipped(what, describe_object(obj), str(e))
        except Exception as e:
            # A converter bug must cost one object, not the whole watch.
            return None, Skipped(what, describe_object(obj), f"cannot convert: {e!r}"[:300])

    def _convert_listing(
        self, items: list[Any], resource_version: str, stop: threading.Event
    ) -> Listing:
        records: list[SandboxRecord] = []
        skipped: list[Skipped] = []
        for index, item in enumerate(items):
            if index % 1024 == 1023 and stop.is_set():
                # A huge list takes seconds to convert; do not hold up shutdown.
                raise Stopping()
            record, problem = self._to_record("list item", item)
            if record is not None:
                records.append(record)
            if problem is not None:
                skipped.append(problem)
        return Listing(records, skipped, resource_version)

    def _convert_event(self, event_type: str, obj: Any, version: str | None) -> Change:
        what = f"{event_type} event"
        try:
            key = object_key(obj)
        except MalformedObject as e:
            return Change(
                event_type, None, None, version, Skipped(what, describe_object(obj), str(e))
            )
        if event_type == "DELETED":
            return Change(event_type, key, None, version)
        # A record that cannot be converted is removed: whatever we knew
        # about the object is stale now.
        record, problem = self._to_record(what, obj)
        return Change(event_type, key, record, version, problem)

    def watch_blocking(
        self,
        stop: threading.Event,
        resource_version: str,
        handlers: WatchHandlers,
        post: Callable[..., None],
    ) -> WatchEnd:
        """
        Watch from C{resource_version} until the stream ends (watch
        thread).  Each event is converted here and handed to C{handlers}
        through C{post} (the reactor's C{callFromThread}), in stream order.
        Never raises: every ending is a L{WatchEnd}.
        """
        version = resource_version
        events = 0
        try:
            response = self._request(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout_s,
                _request_timeout=(
                    self._connect_timeout_s,
                    self._watch_timeout_s + self._request_timeout_s,
                ),
            )
        except Exception as e:
            if stop.is_set():
                return WatchEnd(STOPPED, version, 0)
            if isinstance(e, ApiException) and e.status == 410:
                return WatchEnd(GONE, version, 0, "HTTP 410 Gone, listing again")
            return WatchEnd(ERROR, version, 0, f"watch failed: {describe_error(e)}")
        if not self._publish(response, stop):
            self._release(response)
            return WatchEnd(STOPPED, version, 0)
        try:
            for line in _iter_lines(response):
                if stop.is_set():
                    return WatchEnd(STOPPED, version, events)
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    post(handlers.skip_line, "not JSON")
                    continue
                if not isinstance(event, dict):
                    post(handlers.skip_line, "not a JSON object")
                    continue
                event_type = event.get("type")
                obj = event.get("object")
                if event_type == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    if code == 410:
                        return WatchEnd(GONE, version, events)
                    message = obj.get("message") if isinstance(obj, dict) else None
                    text = " ".join(str(message or "").split())[:200]
                    return WatchEnd(ERROR, version, events, f"watch ERROR event {code}: {text}")
                object_version = object_resource_version(obj)
                if event_type == "BOOKMARK":
                    # A bookmark only moves the version forward; its object
                    # carries nothing else worth reading.
                    if object_version is not None:
                        version = object_version
                        events += 1
                        post(handlers.note_bookmark, object_version)
                    continue
                if event_type not in ("ADDED", "MODIFIED", "DELETED"):
                    post(handlers.skip_line, f"unknown event type {str(event_type)[:40]!r}")
                    continue
                if object_version is not None:
                    version = object_version
                events += 1
                post(handlers.apply_change, self._convert_event(event_type, obj, object_version))
        except Exception as e:
            if stop.is_set():
                return WatchEnd(STOPPED, version, events)
            return WatchEnd(DROPPED, version, events, f"stream broke: {describe_error(e)}")
        finally:
            self._release(response)
        if stop.is_set():
            return WatchEnd(STOPPED, version, events)
        return WatchEnd(CLOSED, version, events)
