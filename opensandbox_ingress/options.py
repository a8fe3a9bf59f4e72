"""
The command line (C{twistd opensandbox-ingress --help}) and its conversion
into an L{IngressConfig}.

Parsing only collects strings; L{config_from_options} converts and
validates them, so a bad value produces one L{ConfigError} line naming the
flag (the twistd plugin prints it and exits non-zero).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from .config import (
    DEFAULT_NAMESPACE,
    DEFAULT_PORT,
    DEFAULT_QUEUE_KEY,
    DEFAULT_REDIS_DSN,
    ConfigError,
    IngressConfig,
    RenewIntentConfig,
    parse_int,
    parse_on_off,
    parse_port,
    parse_seconds,
    parse_secure_access_keys,
)
from .secret_files import DSN_ENV, load_keys_file, resolve_redis_dsn
from .sources.providers import DEFAULT_PROVIDER, describe_choices


class IngressOptions(usage.Options):
    """Options of the C{opensandbox-ingress} twistd plugin."""

    synopsis = "[options]"
    longdesc = (
        "HTTP/WebSocket ingress for OpenSandbox: routes each request to its "
        "sandbox by header, Host or URI path."
    )

    optFlags = [
        ["all-namespaces", None, "Watch sandbox resources cluster-wide."],
        ["renew-intent-enabled", None, "Publish OSEP-0009 renew intents to Redis."],
        ["renew-intent-shared-throttle", None, "Keep the per-sandbox throttle in Redis, shared by all replicas and workers."],
        ["preserve-host", None, "Send the backend the client's Host instead of <endpoint>:<port> (browser apps that check Origin against Host)."],
        ["uri-keep-prefix", None, "URI mode: forward the whole path /<id>/<port>/<rest> (apps served under that base URL); no Location rebase."],
    ]

    optParameters = [
        ["namespace", None, DEFAULT_NAMESPACE, "Watch sandbox resources in this namespace only."],
        ["provider-type", None, DEFAULT_PROVIDER, f"Sandbox source: {describe_choices()}."],
        ["mode", None, "header", "Routing mode: header (header/Host) or uri (/<id>/<port>/...)."],
        ["port", None, str(DEFAULT_PORT), "TCP port to listen on, all interfaces (ignored when --listen is given)."],
        ["log-level", None, "info", "Log level: debug, info, warn or error."],
        ["log-format", None, "text", "Log format: text or json (one object per line)."],
        ["secure-access-keys", None, "", "OSEP-0011 verification keys: id=BASE64[,id=base64:BASE64...]."],
        ["renew-intent-redis-dsn", None, None, f"Redis DSN for renew intents (may carry user:password@; rediss:// for TLS) [default: ${DSN_ENV}, else {DEFAULT_REDIS_DSN}]."],
        ["renew-intent-redis-dsn-file", None, None, f"Read the Redis DSN from this file instead (keeps a password out of argv; or set ${DSN_ENV})."],
        ["secure-access-keys-file", None, None, "Read the OSEP-0011 keys from this file (same syntax, one a line); re-read when it changes."],
        ["renew-intent-queue-key", None, DEFAULT_QUEUE_KEY, "Redis list key for renew intents."],
        ["renew-intent-queue-max-len", None, "0", "LTRIM the list to this length after each push; 0 = no cap."],
        ["renew-intent-min-interval", None, "60", "Seconds between two intents for the same sandbox."],
        ["sandboxes-file", None, None, "JSON/YAML file of sandboxes for --provider-type file."],
        ["kubeconfig", None, None, "Path of a kubeconfig file (default: $KUBECONFIG, then in-cluster, then ~/.kube/config)."],
        ["context", None, None, "Kubeconfig context to use."],
        ["upstream-connect-timeout", None, "10", "Seconds to connect to a sandbox."],
        ["idle-timeout", None, "300", "Seconds without any byte moving before a client or upstream connection is closed; 0 = never."],
        ["header-timeout", None, "30", "Seconds a client may take to send a request's headers."],
        ["websocket-ping-interval", None, "30", "Seconds between WebSocket keep-alive pings on both hops; 0 = off."],
        ["websocket-compression", None, "on", "permessage-deflate on the client hop when the client offers it: on or off."],
        ["websocket-max-message-bytes", None, "0", "Bytes a WebSocket message may carry (inflated); larger fails its sender with 1009. 0 = no limit."],
        ["ready-wait", None, "0", "Seconds a request for a not-ready sandbox waits for it; 0 = answer 503 at once."],
        ["shutdown-timeout", None, "30", "Seconds a graceful shutdown (SIGTERM) may take."],
        ["workers", None, "1", "Processes sharing the listeners."],
        ["max-header-bytes", None, "16384", "Bytes a request head may take; a larger one is answered 431."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["admin-listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on a Twisted server endpoint string (tcp:28888:interface=127.0.0.1,
        ssl:..., unix:..., systemd:domain=INET:index=0); repeatable; replaces --port.
        """
        self["listen"].append(endpoint)

    def opt_admin_listen(self, endpoint: str) -> None:
        """Endpoint for metrics and the read-only routing view; repeatable; off by default."""
        self["admin-listen"].append(endpoint)

    def opt_version(self) -> None:
        """Print the build metadata and exit."""
        from . import buildinfo

        info = buildinfo.current()
        print(f"opensandbox-ingress {info.version} commit={info.git_commit} built={info.build_time}")
        raise SystemExit(0)


def config_from_options(options: Any) -> IngressConfig:
    """
    Convert parsed options (an L{IngressOptions} or any mapping with the
    same keys) into a validated L{IngressConfig}.

    @raise ConfigError: naming the first bad flag.
    """
    listen = tuple(options.get("listen") or ())
    if not listen:
        listen = (f"tcp:{parse_port(str(options['port']))}",)
    else:
        parse_port(str(options["port"]))
    for description in listen:
        _check_endpoint(description, "listen")
    admin = tuple(options.get("admin-listen") or ())
    for description in admin:
        _check_endpoint(description, "admin-listen")
    config = IngressConfig(
        namespace=options["namespace"],
        all_namespaces=bool(options["all-namespaces"]),
        provider_type=options["provider-type"],
        mode=options["mode"],
        listen=listen,
        log_level=options["log-level"],
        log_format=options["log-format"],
        secure_access_keys=parse_secure_access_keys(options["secure-access-keys"] or ""),
        secure_access_keys_file=options.get("secure-access-keys-file") or None,
        renew_intent=RenewIntentConfig(
            enabled=bool(options["renew-intent-enabled"]),
            redis_dsn=resolve_redis_dsn(
                options.get("renew-intent-redis-dsn"), options.get("renew-intent-redis-dsn-file")
            ),
            queue_key=options["renew-intent-queue-key"],
            queue_max_len=parse_int(
                str(options["renew-intent-queue-max-len"]), "renew-intent-queue-max-len"
            ),
            min_interval_s=parse_seconds(
                str(options["renew-intent-min-interval"]), "renew-intent-min-interval"
            ),
            shared_throttle=bool(options.get("renew-intent-shared-throttle")),
        ),
        sandboxes_file=options["sandboxes-file"],
        kubeconfig=options["kubeconfig"],
        context=options["context"],
        admin_listen=admin,
        upstream_connect_timeout_s=parse_seconds(
            str(options["upstream-connect-timeout"]), "upstream-connect-timeout"
        ),
        idle_timeout_s=parse_seconds(str(options["idle-timeout"]), "idle-timeout"),
        header_timeout_s=parse_seconds(str(options["header-timeout"]), "header-timeout"),
        websocket_ping_interval_s=parse_seconds(
            str(options["websocket-ping-interval"]), "websocket-ping-interval"
        ),
        websocket_compression=parse_on_off(
            str(options["websocket-compression"]), "websocket-compression"
        ),
        websocket_max_message_bytes=parse_int(
            str(options["websocket-max-message-bytes"]), "websocket-max-message-bytes"
        ),
        ready_wait_s=parse_seconds(str(options["ready-wait"]), "ready-wait"),
        shutdown_timeout_s=parse_seconds(str(options["shutdown-timeout"]), "shutdown-timeout"),
        workers=parse_int(str(options["workers"]), "workers", minimum=1),
        max_header_bytes=parse_int(
            str(options["max-header-bytes"]), "max-header-bytes", minimum=1024
        ),
        preserve_host=bool(options.get("preserve-host")),
        uri_keep_prefix=bool(options.get("uri-keep-prefix")),
    )
    config.validate()
    if config.secure_access_keys_file:
        # Read it now too, so that a broken file stops the start (also of
        # a --workers supervisor, which never builds an ingress itself).
        load_keys_file(config.secure_access_keys_file)
    return config


def _check_endpoint(description: str, flag: str) -> None:
    """Reject endpoint strings that Twisted cannot parse, before start-up."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        # Building an endpoint does not listen; it does parse every argument
        # (and loads TLS certificates), so mistakes surface before start-up.
        serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(flag, f"{description!r} is not a server endpoint: {e}") from None
