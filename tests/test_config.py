"""The command line and the validated configuration (SPEC section 1)."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opensandbox_ingress.config import (
    ConfigError,
    IngressConfig,
    RedisDsn,
    RenewIntentConfig,
    parse_port,
    parse_redis_dsn,
    parse_secure_access_keys,
)
from opensandbox_ingress.options import IngressOptions, config_from_options

SECRET = base64.b64encode(b"secret").decode()  # c2VjcmV0


def configure(*argv: str) -> IngressConfig:
    """Parse a command line the way the twistd plugin does."""
    options = IngressOptions()
    options.parseOptions(list(argv))
    return config_from_options(options)


# -- defaults --------------------------------------------------------------------


def test_defaults_from_empty_command_line() -> None:
    """An empty command line gives SPEC 1's default for every flag."""
    assert configure() == IngressConfig(
        namespace="opensandbox",
        all_namespaces=False,
        provider_type="batchsandbox",
        mode="header",
        listen=("tcp:28888",),
        log_level="info",
        log_format="text",
        secure_access_keys=(),
        renew_intent=RenewIntentConfig(
            enabled=False,
            redis_dsn="redis://127.0.0.1:6379/0",
            queue_key="opensandbox:renew:intent",
            queue_max_len=0,
            min_interval_s=60.0,
        ),
        sandboxes_file=None,
        kubeconfig=None,
        context=None,
        admin_listen=(),
        upstream_connect_timeout_s=10.0,
        idle_timeout_s=300.0,
        header_timeout_s=30.0,
        websocket_ping_interval_s=30.0,
        ready_wait_s=0.0,
        shutdown_timeout_s=30.0,
        workers=1,
        max_header_bytes=16384,
        websocket_compression=True,
        websocket_max_message_bytes=0,
    )


def test_dataclass_defaults_match_command_line() -> None:
    """IngressConfig() (the embedding default) equals the command-line default, and validates."""
    assert IngressConfig().validate() == configure()


def test_options_raw_defaults() -> None:
    """The parsed options hold SPEC 1's defaults before conversion."""
    options = IngressOptions()
    options.parseOptions([])
    assert options["port"] == "28888"
    assert options["listen"] == []
    assert options["admin-listen"] == []
    assert not options["all-namespaces"]
    assert not options["renew-intent-enabled"]
    assert options["renew-intent-queue-max-len"] == "0"
    assert options["renew-intent-min-interval"] == "60"


# -- accepted values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--namespace", "team-a"], "namespace", "team-a"),
        (["--all-namespaces"], "all_namespaces", True),
        (["--all-namespaces", "--namespace", "Not_A_Label"], "all_namespaces", True),
        (["--provider-type", "agent-sandbox"], "provider_type", "agent-sandbox"),
        (
            ["--provider-type", "file", "--sandboxes-file", "/tmp/s.yaml"],
            "sandboxes_file",
            "/tmp/s.yaml",
        ),
        (["--mode", "uri"], "mode", "uri"),
        (["--port", "8080"], "listen", ("tcp:8080",)),
        (["--port", "1"], "listen", ("tcp:1",)),
        (["--port", "65535"], "listen", ("tcp:65535",)),
        (["--listen", "tcp:0:interface=127.0.0.1"], "listen", ("tcp:0:interface=127.0.0.1",)),
        (
            ["--port", "9", "--listen", "tcp:1", "--listen", "unix:/tmp/x.sock"],
            "listen",
            ("tcp:1", "unix:/tmp/x.sock"),
        ),
        (["--admin-listen", "tcp:9090"], "admin_listen", ("tcp:9090",)),
        (["--log-level", "debug"], "log_level", "debug"),
        (["--log-level", "warn"], "log_level", "warn"),
        (["--log-format", "json"], "log_format", "json"),
        (["--kubeconfig", "/k", "--context", "c"], "context", "c"),
        (["--upstream-connect-timeout", "2.5"], "upstream_connect_timeout_s", 2.5),
        (["--idle-timeout", "0"], "idle_timeout_s", 0.0),
        (["--header-timeout", "5"], "header_timeout_s", 5.0),
        (["--max-header-bytes", "4096"], "max_header_bytes", 4096),
        (["--websocket-ping-interval", "0"], "websocket_ping_interval_s", 0.0),
        (["--websocket-compression", "off"], "websocket_compression", False),
        (["--websocket-compression", "ON"], "websocket_compression", True),
        (["--websocket-max-message-bytes", "1048576"], "websocket_max_message_bytes", 1048576),
        (["--ready-wait", "15"], "ready_wait_s", 15.0),
        (["--shutdown-timeout", "0"], "shutdown_timeout_s", 0.0),
        (["--workers", "4"], "workers", 4),
    ],
)
def test_accepted_values(argv: list[str], field: str, value: object) -> None:
    """Each flag's valid values land in the matching configuration field."""
    assert getattr(configure(*argv), field) == value


def test_renew_intent_flags() -> None:
    """The renew-intent flags fill RenewIntentConfig."""
    config = configure(
        "--renew-intent-enabled",
        "--renew-intent-redis-dsn",
        "rediss://u:p@redis:6380/3",
        "--renew-intent-queue-key",
        "k",
        "--renew-intent-queue-max-len",
        "100",
        "--renew-intent-min-interval",
        "0.5",
    )
    assert config.renew_intent == RenewIntentConfig(
        enabled=True,
        redis_dsn="rediss://u:p@redis:6380/3",
        queue_key="k",
        queue_max_len=100,
        min_interval_s=0.5,
    )


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("", ()),
        ("  ", ()),
        (f"a={SECRET}", (("a", b"secret"),)),
        (f"a=base64:{SECRET}", (("a", b"secret"),)),
        (f" b = {SECRET} , a=base64:{SECRET}", (("a", b"secret"), ("b", b"secret"))),
        (f"0={base64.b64encode(b'x').decode()}", (("0", b"x"),)),
        (f"z={base64.b64encode(bytes(range(256))).decode()}", (("z", bytes(range(256))),)),
    ],
)
def test_secure_access_keys_accepted(text: str, keys: tuple[tuple[str, bytes], ...]) -> None:
    """Keys accept both id=BASE64 and id=base64:BASE64, sorted by id."""
    assert parse_secure_access_keys(text) == keys
    assert configure("--secure-access-keys", text).secure_access_keys == keys


@pytest.mark.parametrize(
    ("dsn", "parsed"),
    [
        (
            "redis://127.0.0.1:6379/0",
            RedisDsn("redis://127.0.0.1:6379/0", False, "127.0.0.1", 6379, 0, None, None),
        ),
        ("redis://h", RedisDsn("redis://h", False, "h", 6379, 0, None, None)),
        ("redis://h/", RedisDsn("redis://h/", False, "h", 6379, 0, None, None)),
        (
            "rediss://user:pa55@redis.example:6380/7",
            RedisDsn(
                "rediss://user:pa55@redis.example:6380/7",
                True,
                "redis.example",
                6380,
                7,
                "user",
                "pa55",
            ),
        ),
        ("redis://:pw@h/1", RedisDsn("redis://:pw@h/1", False, "h", 6379, 1, None, "pw")),
        ("redis://[::1]:7000", RedisDsn("redis://[::1]:7000", False, "::1", 7000, 0, None, None)),
    ],
)
def test_redis_dsn_parsed(dsn: str, parsed: RedisDsn) -> None:
    """A Redis DSN yields host, port, db, TLS and optional user:password."""
    assert parse_redis_dsn(dsn) == parsed


# -- rejected values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        (["--mode", "path"], "mode", "'path'"),
        (["--mode", ""], "mode", "unknown mode"),
        (["--provider-type", "k8s"], "provider-type", "'k8s'"),
        (["--log-level", "trace"], "log-level", "'trace'"),
        (["--log-level", "INFO"], "log-level", "'INFO'"),
        (["--log-format", "xml"], "log-format", "'xml'"),
        (["--namespace", "Bad_NS"], "namespace", "'Bad_NS'"),
        (["--namespace", ""], "namespace", "''"),
        (["--port", "0"], "port", "'0'"),
        (["--port", "65536"], "port", "'65536'"),
        (["--port", "abc"], "port", "'abc'"),
        (["--port", "-1"], "port", "'-1'"),
        (["--port", ""], "port", "''"),
        (["--port", "²"], "port", "'²'"),
        pytest.param(["--port", "9" * 5000], "port", "1..65535", id="huge-port"),
        (["--listen", "tcp:1", "--port", "abc"], "port", "'abc'"),
        (["--listen", "bogus:1"], "listen", "'bogus:1'"),
        (["--listen", "tcp:notaport"], "listen", "'tcp:notaport'"),
        (["--listen", "tcp:1", "--listen", "nope"], "listen", "'nope'"),
        (["--admin-listen", "bogus:1"], "admin-listen", "'bogus:1'"),
        (["--upstream-connect-timeout", "0"], "upstream-connect-timeout", "> 0"),
        (["--upstream-connect-timeout", "-1"], "upstream-connect-timeout", "'-1'"),
        (["--idle-timeout", "-1"], "idle-timeout", "'-1'"),
        (["--idle-timeout", "soon"], "idle-timeout", "'soon'"),
        (["--idle-timeout", "inf"], "idle-timeout", "'inf'"),
        (["--idle-timeout", "nan"], "idle-timeout", "'nan'"),
        (["--header-timeout", "0"], "header-timeout", "> 0"),
        (["--websocket-ping-interval", "-0.5"], "websocket-ping-interval", "'-0.5'"),
        (["--ready-wait", "-3"], "ready-wait", "'-3'"),
        (["--shutdown-timeout", "-1"], "shutdown-timeout", "'-1'"),
        (["--workers", "0"], "workers", "'0'"),
        (["--max-header-bytes", "100"], "max-header-bytes", "'100'"),
        (["--websocket-compression", "yes"], "websocket-compression", "'yes'"),
        (["--websocket-max-message-bytes", "-1"], "websocket-max-message-bytes", "'-1'"),
        (["--workers", "-2"], "workers", "'-2'"),
        (["--workers", "two"], "workers", "'two'"),
        (["--renew-intent-queue-max-len", "-1"], "renew-intent-queue-max-len", "'-1'"),
        (["--renew-intent-queue-max-len", "x"], "renew-intent-queue-max-len", "'x'"),
        (["--renew-intent-min-interval", "-1"], "renew-intent-min-interval", "'-1'"),
        (["--renew-intent-queue-key", ""], "renew-intent-queue-key", "empty"),
        (["--provider-type", "file"], "sandboxes-file", "required"),
        (["--provider-type", "file", "--sandboxes-file", ""], "sandboxes-file", "required"),
        # Secure-access keys: the message names the bad segment by position
        # (and key id), never by its secret.
        (["--secure-access-keys", "abc"], "secure-access-keys", "segment 1 is not id=BASE64"),
        (
            ["--secure-access-keys", f"a={SECRET},b{SECRET}"],
            "secure-access-keys",
            "segment 2 is not id=BASE64",
        ),
        (["--secure-access-keys", f"A={SECRET}"], "secure-access-keys", "segment 1 (key id 'A')"),
        (["--secure-access-keys", f"ab={SECRET}"], "secure-access-keys", "one character"),
        (["--secure-access-keys", f"={SECRET}"], "secure-access-keys", "one character"),
        (["--secure-access-keys", f"-={SECRET}"], "secure-access-keys", "one character"),
        (["--secure-access-keys", "a=not base64!"], "secure-access-keys", "not valid base64"),
        (["--secure-access-keys", "a=c2VjcmV"], "secure-access-keys", "not valid base64"),
        (["--secure-access-keys", "a=base64:é"], "secure-access-keys", "not valid base64"),
        (["--secure-access-keys", "a="], "secure-access-keys", "secret is empty"),
        (["--secure-access-keys", "a=base64:"], "secure-access-keys", "secret is empty"),
        (
            ["--secure-access-keys", f"a={SECRET},a=base64:{SECRET}"],
            "secure-access-keys",
            "segment 2",
        ),
        (["--secure-access-keys", f"a={SECRET},"], "secure-access-keys", "segment 2 is empty"),
        # Redis DSN.
        (["--renew-intent-redis-dsn", "http://h:6379/0"], "renew-intent-redis-dsn", "scheme"),
        (["--renew-intent-redis-dsn", "127.0.0.1:6379"], "renew-intent-redis-dsn", "scheme"),
        (["--renew-intent-redis-dsn", "redis://h:port/0"], "renew-intent-redis-dsn", "unparsable"),
        (["--renew-intent-redis-dsn", "redis://h:99999/0"], "renew-intent-redis-dsn", "unparsable"),
        (["--renew-intent-redis-dsn", "redis://[::1/0"], "renew-intent-redis-dsn", "unparsable"),
        (["--renew-intent-redis-dsn", "redis:///0"], "renew-intent-redis-dsn", "no host"),
        (["--renew-intent-redis-dsn", "redis://h/db1"], "renew-intent-redis-dsn", "'db1'"),
        (["--renew-intent-redis-dsn", "redis://h/0/1"], "renew-intent-redis-dsn", "'0/1'"),
        (["--renew-intent-redis-dsn", "redis://h/²"], "renew-intent-redis-dsn", "'²'"),
    ],
)
def test_rejected_values(argv: list[str], flag: str, detail: str) -> None:
    """A bad value raises one ConfigError line starting '--<flag>:' that shows the value."""
    with pytest.raises(ConfigError) as e:
        configure(*argv)
    message = str(e.value)
    assert message.startswith(f"--{flag}: "), message
    assert e.value.flag == flag
    assert detail in message
    assert "\n" not in message


def test_duplicate_key_names_the_id() -> None:
    """A key id given twice is named in the error."""
    with pytest.raises(ConfigError, match=r"key id 'a' given twice"):
        parse_secure_access_keys(f"a={SECRET},a={SECRET}")


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"provider_type": "kube"}, "provider-type"),
        ({"mode": "path"}, "mode"),
        ({"listen": ()}, "listen"),
        ({"workers": 0}, "workers"),
        ({"idle_timeout_s": float("nan")}, "idle-timeout"),
        ({"renew_intent": RenewIntentConfig(redis_dsn="mysql://h")}, "renew-intent-redis-dsn"),
        ({"renew_intent": RenewIntentConfig(queue_max_len=-1)}, "renew-intent-queue-max-len"),
        ({"renew_intent": RenewIntentConfig(min_interval_s=-1)}, "renew-intent-min-interval"),
    ],
)
def test_validate_direct_construction(change: dict[str, object], flag: str) -> None:
    """IngressConfig.validate gives embedders the same flag-named errors."""
    config = dataclasses.replace(IngressConfig(), **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        config.validate()
    assert str(e.value).startswith(f"--{flag}: ")


@given(st.integers(min_value=1, max_value=65535))
def test_parse_port_accepts_range(port: int) -> None:
    """Every port in 1..65535 parses."""
    assert parse_port(str(port)) == port


@given(st.one_of(st.text(max_size=8), st.sampled_from(["²", "٣", "08080", "9" * 5000])))
def test_parse_port_only_raises_config_error(text: str) -> None:
    """parse_port either returns a port in range or raises ConfigError, never anything else."""
    try:
        port = parse_port(text)
    except ConfigError as e:
        assert str(e).startswith("--port: ")
    else:
        assert 1 <= port <= 65535
        assert int(text) == port


def test_key_errors_never_echo_the_secret() -> None:
    """A malformed key's error line names the segment but not the secret in it."""
    for value in (f"A={SECRET}", f"a={SECRET},{SECRET}", "a=not*base64!", f"a={SECRET},a={SECRET}"):
        with pytest.raises(ConfigError) as e:
            parse_secure_access_keys(value)
        message = str(e.value)
        assert SECRET not in message and "not*base64" not in message, message
