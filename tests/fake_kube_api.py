"""
A small fake Kubernetes API server for custom objects.

The real C{kubernetes} client talks to it over real HTTP on 127.0.0.1, so
tests exercise the client's actual request building, chunked stream
reading, error mapping and timeouts; nothing is mocked.  It serves, like
the real API server:

  - C{GET /apis/{group}/{version}/namespaces/{ns}/{plural}} and the
    cluster-wide C{GET /apis/{group}/{version}/{plural}}: a list with
    C{metadata.resourceVersion};
  - the same with C{watch=true}: a chunked stream of JSON lines
    C{{"type": ..., "object": ...}} starting after C{resourceVersion}
    (or synthetic C{ADDED} events for everything when it is empty or
    C{"0"}), with C{BOOKMARK} events only when C{allowWatchBookmarks=true},
    ending normally after C{timeoutSeconds};
  - a C{resourceVersion} older than the last compaction answers 410: as an
    C{ERROR} event carrying a C{Status} with code 410 (what the real server
    usually does), or as an HTTP 410 response when C{gone_as_http_status}.

Resource versions come from one global counter, like etcd's revision.

Test controls (call them from any thread): L{create}, L{update},
L{delete}, L{emit}, L{emit_raw}, L{bookmark}, L{compact}, L{drop_watches}
(abrupt: no terminating chunk), L{end_watches} (normal end),
L{expire_watches} (ERROR 410 on open streams), L{stall_watches} (open
streams go silent for good without closing, as a half-dead connection
does), L{pause_watches} / L{resume_watches} (hold back delivery, then
send the backlog), L{fail_next} / L{clear_failures} (HTTP errors),
L{hold_next} (accept, never answer),
and the request log L{requests}.  L{create_many} loads many objects at
once (benchmarks).

Threads: one server thread plus one per connection (daemon threads); all
state is guarded by one condition variable.
"""

from __future__ import annotations

import bisect
import copy
import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Resource = tuple[str, str, str]  # group, version, plural

#: How often an idle watch stream checks whether its client went away.
PEER_CHECK_INTERVAL_S = 0.05


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    params: dict[str, str]
    authorization: str | None
    at: float
    #: The client's C{User-Agent} header.
    user_agent: str | None = None

    @property
    def watch(self) -> bool:
        """Whether it was a watch (C{watch=true})."""
        return self.params.get("watch", "").lower() in ("true", "1")

    @property
    def resource_version(self) -> str | None:
        """Its C{resourceVersion} parameter."""
        return self.params.get("resourceVersion")


@dataclass
class _Change:
    revision: int
    resource: Resource
    namespace: str
    event_type: str
    payload: Any  # the object, or raw bytes for emit_raw


@dataclass(eq=False)
class _Stream:
    connection: socket.socket
    resource: Resource
    namespace: str | None
    allow_bookmarks: bool
    deadline: float | None
    index: int
    bookmark_seen: int
    dropped: bool = False
    ended: bool = False
    expired: bool = False
    stalled: bool = False


@dataclass
class _State:
    revision: int = 1000
    compacted: int = 0
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[_Change] = field(default_factory=list)
    revisions: list[int] = field(default_factory=list)
    bookmark_seq: int = 0
    bookmark_revision: int = 0
    streams: set[_Stream] = field(default_factory=set)
    failures: list[int] = field(default_factory=list)
    holds: int = 0
    held: int = 0
    paused: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)
    connections: set[socket.socket] = field(default_factory=set)
    stopping: bool = False


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._track(self.connection, False)

    def do_GET(self) -> None:
        self.server.api._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeKubeAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections are part of the tests


class FakeKubeAPI:
    """
    The fake server; see the module docstring.  Use as a context manager or
    call L{start} and L{stop}.

    @ivar gone_as_http_status: Answer too-old versions with HTTP 410
        instead of an C{ERROR} event in a 200 stream.
    """

    def __init__(self, *, gone_as_http_status: bool = False) -> None:
        self.gone_as_http_status = gone_as_http_status
        self._cond = threading.Condition()
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> str:
        """Listen on an ephemeral port of 127.0.0.1; return the base URL."""
        server = _Server(("127.0.0.1", 0), _Handler)
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-kube-api",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Close every connection and stop serving."""
        with self._cond:
            self._state.stopping = True
            connections = list(self._state.connections)
            self._cond.notify_all()
        for connection in connections:
            _shutdown(connection)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeKubeAPI:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT}."""
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- objects ----------------------------------------------------------------

    def _record(self, resource: Resource, event_type: str, namespace: str, payload: Any) -> int:
        # Caller holds the lock.
        state = self._state
        state.revision += 1
        if isinstance(payload, dict) and isinstance(payload.get("metadata"), dict):
            payload["metadata"]["resourceVersion"] = str(state.revision)
        state.history.append(
            _Change(state.revision, resource, namespace, event_type, copy.deepcopy(payload))
        )
        state.revisions.append(state.revision)
        self._cond.notify_all()
        return state.revision

    def create(self, obj: dict[str, Any], *, plural: str) -> dict[str, Any]:
        """
        Store a new object (C{apiVersion} and C{metadata.name} required,
        namespace defaults to C{default}); emits C{ADDED}.  Returns the
        stored object with its uid and resourceVersion.
        """
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("namespace", "default")
        metadata.setdefault("uid", str(uuid.uuid4()))
        group, version = _split_api_version(obj["apiVersion"])
        key = (plural, metadata["namespace"], metadata["name"])
        with self._cond:
            if key in self._state.objects:
                raise ValueError(f"{key} exists")
            self._record((group, version, plural), "ADDED", metadata["namespace"], obj)
            self._state.objects[key] = obj
            return copy.deepcopy(obj)

    def update(self, obj: dict[str, Any], *, plural: str) -> dict[str, Any]:
        """Replace an existing object (its uid is kept); emits C{MODIFIED}."""
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("namespace", "default")
        key = (plural, metadata["namespace"], metadata["name"])
        group, version = _split_api_version(obj["apiVersion"])
        with self._cond:
            old = self._state.objects[key]
            metadata["uid"] = old["metadata"]["uid"]
            self._record((group, version, plural), "MODIFIED", metadata["namespace"], obj)
            self._state.objects[key] = obj
            return copy.deepcopy(obj)

    def delete(self, namespace: str, name: str, *, plural: str) -> None:
        """Remove an object; emits C{DELETED} with its final state."""
        with self._cond:
            obj = self._state.objects.pop((plural, namespace, name))
            group, version = _split_api_version(obj["apiVersion"])
            self._record((group, version, plural), "DELETED", namespace, obj)

    def emit(self, event_type: str, obj: Any, *, resource: Resource, namespace: str) -> str:
        """
        Send an arbitrary event (for malformed objects) to the watches of
        C{resource} in C{namespace}, without storing anything.  Returns the
        revision it got.
        """
        with self._cond:
            return str(self._record(resource, event_type, namespace, copy.deepcopy(obj)))

    def emit_raw(self, line: bytes, *, resource: Resource, namespace: str) -> None:
        """Send one raw line (say, not JSON) to the matching watches."""
        with self._cond:
            self._record(resource, "RAW", namespace, line)

    def create_many(self, objs: list[dict[str, Any]], *, plural: str) -> str:
        """
        Store many new objects at once, like L{create} but without an
        C{ADDED} event each: they share one new resourceVersion, which is
        returned.  For loading large lists quickly; watches opened before
        do not hear of them.
        """
        with self._cond:
            state = self._state
            state.revision += 1
            version = str(state.revision)
            for obj in objs:
                obj = copy.deepcopy(obj)
                metadata = obj.setdefault("metadata", {})
                metadata.setdefault("namespace", "default")
                metadata.setdefault("uid", str(uuid.uuid4()))
                metadata["resourceVersion"] = version
                key = (plural, metadata["namespace"], metadata["name"])
                if key in state.objects:
                    raise ValueError(f"{key} exists")
                state.objects[key] = obj
            self._cond.notify_all()
            return version

    def objects(self, plural: str) -> list[dict[str, Any]]:
        """The stored objects of a plural."""
        with self._cond:
            return [
                copy.deepcopy(o)
                for (p, _, _), o in sorted(self._state.objects.items())
                if p == plural
            ]

    # -- controls ---------------------------------------------------------------

    @property
    def revision(self) -> str:
        """The current global resourceVersion."""
        with self._cond:
            return str(self._state.revision)

    def bookmark(self) -> str:
        """
        Advance the global revision (as writes to other resources would) and
        send a C{BOOKMARK} at it to every open watch that allows bookmarks.
        Returns that resourceVersion.
        """
        with self._cond:
            state = self._state
            state.revision += 1
            state.bookmark_seq += 1
            state.bookmark_revision = state.revision
            self._cond.notify_all()
            return str(state.revision)

    def compact(self) -> str:
        """Forget history: watches from an older version now get 410."""
        with self._cond:
            self._state.compacted = self._state.revision
            return str(self._state.compacted)

    def drop_watches(self) -> int:
        """
        Cut every open watch stream abruptly (socket shut down, no
        terminating chunk); events recorded afterwards are not delivered on
        them.  Returns how many were cut.
        """
        with self._cond:
            streams = list(self._state.streams)
            for stream in streams:
                stream.dropped = True
                _shutdown(stream.connection)
            self._cond.notify_all()
        return len(streams)

    def end_watches(self) -> int:
        """End every open watch stream normally, as C{timeoutSeconds} would."""
        with self._cond:
            for stream in self._state.streams:
                stream.ended = True
            self._cond.notify_all()
            return len(self._state.streams)

    def expire_watches(self) -> int:
        """Send C{ERROR} (Status 410) on every open watch stream, then end it."""
        with self._cond:
            for stream in self._state.streams:
                stream.expired = True
            self._cond.notify_all()
            return len(self._state.streams)

    def stall_watches(self) -> int:
        """
        Make every open watch stream go silent for good without closing it,
        like a connection whose peer vanished: nothing more is sent on it,
        not even the end at C{timeoutSeconds}; it only closes when the client
        closes it (or the server stops).  Events recorded meanwhile reach the
        client only on a later watch.  Returns how many streams stalled.
        """
        with self._cond:
            for stream in self._state.streams:
                stream.stalled = True
            self._cond.notify_all()
            return len(self._state.streams)

    def pause_watches(self) -> None:
        """
        Hold back delivery on every watch stream (open or future) until
        L{resume_watches}; changes recorded meanwhile pile up.  Streams stay
        open, and their C{timeoutSeconds} waits until delivery resumes.
        """
        with self._cond:
            self._state.paused = True

    def resume_watches(self) -> None:
        """Deliver what L{pause_watches} held back, as fast as possible."""
        with self._cond:
            self._state.paused = False
            self._cond.notify_all()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next C{count} requests with HTTP C{status}."""
        with self._cond:
            self._state.failures.extend([status] * count)

    def clear_failures(self) -> int:
        """Forget the failures L{fail_next} has not used yet; returns how many."""
        with self._cond:
            left = len(self._state.failures)
            self._state.failures.clear()
            return left

    def hold_next(self, count: int) -> None:
        """Accept the next C{count} requests but answer none until L{release}."""
        with self._cond:
            self._state.holds += count

    def release(self) -> None:
        """Close the held requests without an answer."""
        with self._cond:
            self._state.held = 0
            self._cond.notify_all()

    @property
    def open_watches(self) -> int:
        """How many watch streams are open now."""
        with self._cond:
            return len(self._state.streams)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._cond:
            return list(self._state.requests)

    def watch_requests(self) -> list[RecordedRequest]:
        """The watch requests received so far."""
        return [r for r in self.requests if r.watch]

    def list_requests(self) -> list[RecordedRequest]:
        """The list (non-watch) requests received so far."""
        return [r for r in self.requests if not r.watch]

    # -- serving (connection threads) -------------------------------------------

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._state.connections.add(connection)
            else:
                self._state.connections.discard(connection)

    def _handle(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        request = RecordedRequest(
            "GET",
            parts.path,
            params,
            handler.headers.get("Authorization"),
            time.monotonic(),
            handler.headers.get("User-Agent"),
        )
        with self._cond:
            state = self._state
            state.requests.append(request)
            if state.holds:
                # A black-holed server: accept the request, never answer.
                state.holds -= 1
                state.held += 1
                while state.held and not state.stopping:
                    self._cond.wait()
                handler.close_connection = True
                return
            failure = state.failures.pop(0) if state.failures else None
        if failure is not None:
            _send_json(handler, failure, _status(failure, "InternalError", "injected failure"))
            return
        route = _route(parts.path)
        if route is None:
            _send_json(handler, 404, _status(404, "NotFound", f"no route {parts.path}"))
            return
        resource, namespace = route
        if request.watch:
            self._watch(handler, resource, namespace, params)
        else:
            self._list(handler, resource, namespace)

    def _matches(self, change: _Change, resource: Resource, namespace: str | None) -> bool:
        return change.resource == resource and namespace in (None, change.namespace)

    def _list(self, handler: _Handler, resource: Resource, namespace: str | None) -> None:
        group, version, plural = resource
        with self._cond:
            items = [
                copy.deepcopy(obj)
                for (p, ns, _), obj in sorted(self._state.objects.items())
                if p == plural
                and obj["apiVersion"] == f"{group}/{version}"
                and namespace in (None, ns)
            ]
            revision = self._state.revision
        _send_json(
            handler,
            200,
            {
                "apiVersion": f"{group}/{version}",
                "kind": "List",
                "metadata": {"resourceVersion": str(revision)},
                "items": items,
            },
        )

    def _watch(
        self,
        handler: _Handler,
        resource: Resource,
        namespace: str | None,
        params: dict[str, str],
    ) -> None:
        group, version, plural = resource
        since = params.get("resourceVersion", "")
        allow_bookmarks = params.get("allowWatchBookmarks", "").lower() == "true"
        timeout = params.get("timeoutSeconds")
        deadline = time.monotonic() + int(timeout) if timeout else None
        initial: list[dict[str, Any]] = []
        too_old: str | None = None
        with self._cond:
            state = self._state
            if since in ("", "0"):
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (p, ns, _), obj in sorted(state.objects.items())
                    if p == plural
                    and obj["apiVersion"] == f"{group}/{version}"
                    and namespace in (None, ns)
                ]
                index = len(state.history)
            elif not since.isdigit():
                too_old = None
                index = -1
            elif int(since) < state.compacted:
                too_old = f"too old resource version: {since} ({state.compacted})"
                index = -1
            else:
                index = bisect.bisect_right(state.revisions, int(since))
            stream = _Stream(
                handler.connection,
                resource,
                namespace,
                allow_bookmarks,
                deadline,
                index,
                state.bookmark_seq,
            )
            if index >= 0:
                state.streams.add(stream)
        if index < 0 and too_old is None:
            _send_json(
                handler, 400, _status(400, "BadRequest", f"invalid resourceVersion {since!r}")
            )
            return
        if too_old is not None and self.gone_as_http_status:
            _send_json(handler, 410, _status(410, "Expired", too_old))
            return
        try:
            _start_chunked(handler)
            if too_old is not None:
                _write_event(handler, {"type": "ERROR", "object": _status(410, "Expired", too_old)})
                _end_chunked(handler)
                return
            for event in initial:
                _write_event(handler, event)
            self._follow(handler, stream, group, version)
        except OSError:
            handler.close_connection = True
        finally:
            with self._cond:
                self._state.streams.discard(stream)

    def _follow(self, handler: _Handler, stream: _Stream, group: str, version: str) -> None:
        while True:
            with self._cond:
                state = self._state
                while True:
                    if stream.dropped or state.stopping:
                        handler.close_connection = True
                        return
                    if stream.stalled or state.paused:
                        if _peer_closed(stream.connection):
                            handler.close_connection = True
                            return
                        self._cond.wait(PEER_CHECK_INTERVAL_S)
                        continue
                    pending = [
                        c
                        for c in state.history[stream.index :]
                        if self._matches(c, stream.resource, stream.namespace)
                    ]
                    stream.index = len(state.history)
                    bookmark = None
                    if stream.allow_bookmarks and state.bookmark_seq > stream.bookmark_seen:
                        stream.bookmark_seen = state.bookmark_seq
                        bookmark = {
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": f"{group}/{version}",
                                "metadata": {"resourceVersion": str(state.bookmark_revision)},
                            },
                        }
                    timed_out = stream.deadline is not None and time.monotonic() >= stream.deadline
                    finish = stream.expired or stream.ended or timed_out
                    if pending or bookmark or finish:
                        break
                    if _peer_closed(stream.connection):
                        # Like the real server, notice a client that went away
                        # (a watch client never sends anything mid-stream).
                        handler.close_connection = True
                        return
                    wait = PEER_CHECK_INTERVAL_S
                    if stream.deadline is not None:
                        wait = min(wait, max(stream.deadline - time.monotonic(), 0))
                    self._cond.wait(wait)
            for change in pending:
                if change.event_type == "RAW":
                    _write_chunk(handler, change.payload + b"\n")
                else:
                    _write_event(handler, {"type": change.event_type, "object": change.payload})
            if bookmark is not None:
                _write_event(handler, bookmark)
            if stream.expired:
                _write_event(
                    handler,
                    {"type": "ERROR", "object": _status(410, "Expired", "watch expired")},
                )
            if finish:
                _end_chunked(handler)
                return


def _route(path: str) -> tuple[Resource, str | None] | None:
    parts = path.strip("/").split("/")
    if len(parts) == 6 and parts[0] == "apis" and parts[3] == "namespaces":
        return (parts[1], parts[2], parts[5]), parts[4]
    if len(parts) == 4 and parts[0] == "apis":
        return (parts[1], parts[2], parts[3]), None
    return None


def _peer_closed(connection: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _shutdown(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _send_json(handler: _Handler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:
        handler.close_connection = True


def _start_chunked(handler: _Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.flush()


def _write_chunk(handler: _Handler, data: bytes) -> None:
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def _write_event(handler: _Handler, event: dict[str, Any]) -> None:
    _write_chunk(handler, json.dumps(event).encode("utf-8") + b"\n")


def _end_chunked(handler: _Handler) -> None:
    handler.wfile.write(b"0\r\n\r\n")
    handler.wfile.flush()
