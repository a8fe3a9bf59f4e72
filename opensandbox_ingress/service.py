"""
Building and running one ingress: the embedding API.

L{build_ingress} turns an L{IngressConfig} into an L{IngressService} (a
C{MultiService}: source, renew publisher, listeners) with no global state,
so several ingresses can live in one process.  C{service.resource} is the
C{Resource} tree for mounting under another program's C{Site}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .config import IngressConfig
from .metrics import IngressMetrics
from .observability import AccessLog, log_build_info
from .registry import SandboxRegistry
from .renew import RenewIntentPublisher
from .secret_files import keys_watcher_for
from .secure_access import KeyRing
from .shared_throttle import SharedThrottlePublisher
from .sources import build_source, name_candidates_for
from .web.admin import AdminResource, AdminSite
from .web.decision import Decider
from .web.forwarding import forward_options
from .web.health import IngressResource
from .web.pool import BackendPool
from .web.proxy import Proxy
from .web.server import ProxyServerFactory
from .web.site import IngressSite
from .web.websocket import WebSocketRelay


class IngressCore:
    """
    The shared state of one ingress: configuration, registry, live
    secure-access keys, metrics, access log, renew publisher and drain
    state (draining, exchanges in flight).  It builds nothing and decides
    nothing: L{IngressService} builds the objects that serve requests and
    hands each the state it reads.

    Ownership: reactor thread.  Nothing in it is global.

    @ivar reactor: the reactor, also the clock (C{IReactorTime}) of every
        timer and timestamp of the web layer.
    """

    def __init__(
        self,
        config: IngressConfig,
        reactor: Any,
        registry: SandboxRegistry,
        secure_access_keys: KeyRing,
        renew: RenewIntentPublisher,
        metrics: IngressMetrics,
        access_log: AccessLog,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.registry = registry
        #: The live OSEP-0011 keys: the flag's, or the keys file's (a
        #: watcher replaces them in place when the file changes).
        self.secure_access_keys = secure_access_keys
        self.renew = renew
        self.metrics = metrics
        self.access_log = access_log
        self.draining = False
        self.active_requests = 0
        self._idle_waiters: list[Deferred[None]] = []

    def request_started(self) -> None:
        """Count an in-flight proxied exchange."""
        self.active_requests += 1

    def request_finished(self) -> None:
        """Uncount one; wake drain waiters when none is left."""
        self.active_requests -= 1
        if self.active_requests == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires when no proxied exchange is in flight."""
        if self.active_requests == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d


class _Listeners(Service):
    """Listens on the configured endpoints; stops listening first at drain."""

    _log = Logger()

    def __init__(self, reactor: Any, descriptions: tuple[str, ...], factory: Any) -> None:
        self._reactor = reactor
        self._descriptions = descriptions
        self._factory = factory
        self.ports: list[IListeningPort] = []
        self._listening: Deferred[Any] | None = None
        #: (fileno, address family, description) of sockets to adopt
        #: instead of listening on C{descriptions} (worker processes).
        self._adopted: list[tuple[int, int, str]] = []

    def adopt(self, fileno: int, family: int, description: str) -> None:
        """
        Serve the already-listening socket C{fileno} (closed once adopted)
        instead of binding C{descriptions}; call before the service starts.
        """
        self._adopted.append((fileno, family, description))

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        ds = []
        for fileno, family, description in self._adopted:
            d = maybeDeferred(self._adopt_port, fileno, family)
            d.addCallback(self._listened, description)
            ds.append(d)
        for description in () if self._adopted else self._descriptions:
            endpoint = serverFromString(self._reactor, description)
            d = endpoint.listen(self._factory)
            d.addCallback(self._listened, description)
            ds.append(d)
        self._listening = DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
        self._listening.addErrback(self._failed)

    def _adopt_port(self, fileno: int, family: int) -> IListeningPort:
        port: IListeningPort = self._reactor.adoptStreamPort(fileno, family, self._factory)
        os.close(fileno)  # the port holds its own duplicate
        return port

    def _listened(self, port: IListeningPort, description: str) -> IListeningPort:
        self.ports.append(port)
        host = port.getHost()
        self._log.info(
            "listening on {description} ({address})",
            description=description,
            address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"
            if hasattr(host, "port")
            else str(getattr(host, "name", host)),
        )
        return port

    def _failed(self, failure: Any) -> None:
        error = failure.value.subFailure if hasattr(failure.value, "subFailure") else failure
        self._log.critical(
            "cannot listen: {error}", error=error.getErrorMessage()
        )
        # A proxy that cannot listen is of no use: stop (under twistd, exit)
        # rather than run on without a listener.
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    def when_listening(self) -> Deferred[Any]:
        """Fires once every endpoint listens."""
        assert self._listening is not None
        d: Deferred[Any] = Deferred()

        def relay(result: Any) -> Any:
            d.callback(result)
            return result

        self._listening.addBoth(relay)
        return d

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        self._listening = None
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()  # type: ignore[misc]


class IngressService(MultiService):
    """
    One running ingress.  Start it (or add it to an application) and it
    serves on C{config.listen}; stop it and it drains: health turns 503,
    listeners close, in-flight requests get up to C{shutdown_timeout_s}.

    @ivar core: the L{IngressCore} (registry, proxy, ...).
    @ivar resource: the root C{Resource} (health + proxy).
    @ivar site: the C{Site} the listeners serve.
    """

    _log = Logger()

    def __init__(self, config: IngressConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        config.validate()
        self.config = config
        self.reactor = reactor
        self.core = core = _build_core(config, reactor)
        #: Re-reads C{--secure-access-keys-file}, if given; loaded now, so a
        #: broken file stops the start with a L{ConfigError}.
        self.keys_watcher = keys_watcher_for(config, core.secure_access_keys, reactor)
        #: The one backend client: connections pooled per sandbox generation.
        self.upstream = BackendPool(reactor, config.upstream_connect_timeout_s)
        #: The one routing decision of both front-ends.
        self.decider = Decider(
            core.registry,
            core.secure_access_keys,
            config.mode == "uri",
            config.ready_wait_s,
            reactor,
            keep_prefix=config.mode == "uri" and config.uri_keep_prefix,
        )
        options = forward_options(config)
        self.websocket = WebSocketRelay(core)
        self.proxy = Proxy(core, self.decider, self.upstream, self.websocket.handle, options)
        core.registry.add_change_listener(self._record_changed)
        self.resource = IngressResource(core, self.proxy)
        self.site = IngressSite(
            self.resource,
            idle_timeout=config.idle_timeout_s,
            header_timeout=config.header_timeout_s,
            reactor=reactor,
        )
        self.source = build_source(config, self.core.registry, reactor)
        self.source.setServiceParent(self)
        self.core.renew.setServiceParent(self)
        if self.keys_watcher is not None:
            self.keys_watcher.setServiceParent(self)
        #: What the proxy listeners serve: the fast path, in front of C{site}.
        self.factory = ProxyServerFactory(
            core, self.site, self.decider, self.upstream, options
        )
        self.listeners = _Listeners(reactor, config.listen, self.factory)
        self.listeners.setServiceParent(self)
        self.admin_site = AdminSite(AdminResource(self.core))
        self.admin_listeners: _Listeners | None = None
        if config.admin_listen:
            self.admin_listeners = _Listeners(reactor, config.admin_listen, self.admin_site)
            self.admin_listeners.setServiceParent(self)
        _export_state(core, self.websocket, self.source)
        #: An ILogObserver that the twistd plugin installs on the application.
        self.log_observer: Any = None

    def _record_changed(self, old: Any, new: Any) -> None:
        # A changed or vanished sandbox's pooled sockets may point at an
        # address that now belongs to someone else.
        if new is None or new.generation != old.generation or new.endpoint != old.endpoint:
            self.upstream.drop_generation(old.generation or old.name)
        self.websocket.sandbox_changed(old, new)

    @property
    def registry(self) -> SandboxRegistry:
        """The sandbox registry this ingress resolves against."""
        return self.core.registry

    def setServiceParent(self, parent: Any) -> None:
        # twistd builds the application after the plugin made this service,
        # and uses an ILogObserver component on the application if there is
        # one; this is how the plugin's --log-level/--log-format take effect.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        log_build_info(self._log)
        if self.config.workers > 1:
            self._log.warn(
                "workers={workers}: multi-process mode is run by the twistd plugin "
                "(opensandbox_ingress.workers); this IngressService is one process",
                workers=self.config.workers,
            )
        super().startService()

    def when_listening(self) -> Deferred[Any]:
        """Fires once every listener is bound (for tests and embedders)."""
        return self.listeners.when_listening()

    def addresses(self) -> list[Any]:
        """The bound addresses of the proxy listeners."""
        return [p.getHost() for p in self.listeners.ports]

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        core = self.core
        core.draining = True
        self._log.info(
            "draining: {active} requests in flight", active=core.active_requests
        )
        await self.listeners.stopService()
        # WebSockets never end by themselves: close them with 1001.
        self.websocket.close_all()
        deadline = self.reactor.seconds() + self.config.shutdown_timeout_s
        if not await self._within(core.when_idle(), deadline):
            self._log.warn(
                "shutdown timeout: cutting {active} requests",
                active=core.active_requests,
            )
            # Cut them now: left to the reactor's shutdown, a request could
            # instead be answered 502 as its backend connection closes.
            self.factory.abort_connections()
        else:
            # Finished responses may still sit in send buffers: close the
            # connections and let them flush, within the same deadline.
            await self._within(self.factory.close_connections(), deadline)
        self.upstream.close()
        # The remaining children (source, publisher) stop in reverse order.
        Service.stopService(self)
        stops = [
            s.stopService()
            for s in reversed(list(self))
            if s is not self.listeners and s.running
        ]
        await DeferredList([d for d in stops if isinstance(d, Deferred)])


    async def _within(self, d: Deferred[None], deadline: float) -> bool:
        """Wait for C{d} until C{deadline}; whether it fired in time."""
        timeout = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), d.cancel)
        try:
            await d
        except Exception:
            return False
        if timeout.active():
            timeout.cancel()
        return True


def _build_core(config: IngressConfig, reactor: Any) -> IngressCore:
    """The state of one ingress, built from C{config}."""
    publisher = (
        SharedThrottlePublisher if config.renew_intent.shared_throttle else RenewIntentPublisher
    )
    metrics = IngressMetrics(config.mode)
    return IngressCore(
        config,
        reactor,
        SandboxRegistry(name_candidates_for(config)),
        KeyRing(config.secure_access_keys),
        publisher(reactor, config.renew_intent),
        metrics,
        AccessLog(clock=reactor.seconds, metrics=metrics, uri_mode=config.mode == "uri"),
    )


def _export_state(core: IngressCore, websocket: WebSocketRelay, source: Any) -> None:
    """Register the scrape-time metrics that read state owned elsewhere."""
    metrics = core.metrics

    def registry_size() -> tuple[str, dict[str, int]]:
        ready = sum(1 for r in core.registry.records() if r.ready and r.endpoint)
        return ("state", {"ready": ready, "not_ready": len(core.registry) - ready})

    metrics.add_gauge(
        "opensandbox_ingress_sandboxes", "Sandboxes in the registry, by readiness.", registry_size
    )
    metrics.add_gauge(
        "opensandbox_ingress_registry_synced",
        "1 once the source delivered its first snapshot.",
        lambda: 1 if core.registry.synced else 0,
    )
    metrics.add_gauge(
        "opensandbox_ingress_active_requests",
        "HTTP exchanges in flight.",
        lambda: core.active_requests,
    )
    metrics.add_gauge(
        "opensandbox_ingress_ready_waiters",
        "Requests holding for a sandbox to become ready.",
        lambda: core.registry.ready_waiters,
    )
    metrics.add_gauge(
        "opensandbox_ingress_websocket_sessions",
        "WebSocket sessions open.",
        lambda: websocket.active_sessions,
    )
    metrics.add_counter(
        "opensandbox_ingress_websocket_sessions_ended_by_sandbox",
        "WebSocket sessions closed because their sandbox was removed, recreated, "
        "moved or changed its access token.",
        lambda: ("reason", dict(websocket.ended_by_sandbox)),
    )
    stats = getattr(source, "stats", None)
    if stats is not None and hasattr(stats, "events"):
        metrics.add_counter(
            "opensandbox_ingress_watch_events",
            "Kubernetes watch events received, by type.",
            lambda: ("type", dict(stats.events)),
        )
        metrics.add_counter(
            "opensandbox_ingress_watch_restarts",
            "Kubernetes watch restarts, by reason.",
            lambda: ("reason", dict(stats.restarts)),
        )
        metrics.add_counter(
            "opensandbox_ingress_watch_lists", "Kubernetes lists applied.", lambda: stats.lists
        )
    renew = core.renew

    def shared() -> int:
        # Intents another process had already published this interval.
        return getattr(renew, "shared_throttled", 0)

    metrics.add_counter(
        "opensandbox_ingress_renew_intents",
        "Renew intents by outcome: published, throttled, dropped, failed.",
        lambda: (
            "outcome",
            {
                "published": renew.stats.published - shared(),
                "throttled": renew.stats.throttled + shared(),
                "dropped": renew.stats.dropped_overflow,
                "failed": renew.stats.failed,
            },
        ),
    )


def build_ingress(config: IngressConfig, reactor: Any = None) -> IngressService:
    """
    Build an ingress from C{config} (validated here).  Start the returned
    service, or add it to an application; C{.resource} can be mounted in
    another C{Site}.
    """
    return IngressService(config, reactor)
