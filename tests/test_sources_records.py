"""
The pure half of the Kubernetes sources: resource objects to registry
records (SPEC 4.1, 4.2) and sandbox-id-to-name mapping (SPEC 4.2).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opensandbox_ingress.errors import SandboxNotReady
from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry
from opensandbox_ingress.sources import agentsandbox, batchsandbox
from opensandbox_ingress.sources._kube_objects import MalformedObject
from opensandbox_ingress.sources.agentsandbox import (
    dns1035_name,
    name_candidates,
    record_from_agentsandbox,
)
from opensandbox_ingress.sources.batchsandbox import record_from_batchsandbox
from tests._kube_helpers import agentsandbox as make_agentsandbox
from tests._kube_helpers import batchsandbox as make_batchsandbox

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
ENDPOINTS = "sandbox.opensandbox.io/endpoints"
TOKEN = "opensandbox.io/secure-access-token"

# examples/batchsandbox.yaml and examples/agentsandbox.yaml, as the API
# server sends them.
EXAMPLE_BATCHSANDBOX: dict[str, Any] = {
    "apiVersion": "sandbox.opensandbox.io/v1alpha1",
    "kind": "BatchSandbox",
    "metadata": {
        "name": "sbx-7f3a9c",
        "namespace": "opensandbox",
        "uid": "5b0f3c7e-8f1d-4c55-9b7a-2d3b1c0e9a11",
        "resourceVersion": "481516",
        "annotations": {ENDPOINTS: '["10.244.1.5"]', TOKEN: "tok-9c1e0b6d"},
    },
    "spec": {"replicas": 1, "poolRef": "default-pool"},
    "status": {"observedGeneration": 1, "replicas": 1, "allocated": 1, "ready": 1},
}
EXAMPLE_AGENTSANDBOX: dict[str, Any] = {
    "apiVersion": "agents.x-k8s.io/v1alpha1",
    "kind": "Sandbox",
    "metadata": {
        "name": "sandbox-4f2a1b",
        "namespace": "opensandbox",
        "uid": "0c9e7d21-3a44-4b1e-8d90-6a1f2b3c4d5e",
        "resourceVersion": "99120",
    },
    "status": {
        "serviceFQDN": "sandbox-4f2a1b.opensandbox.svc.cluster.local",
        "service": "sandbox-4f2a1b",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "DependenciesReady",
                "message": "Pod is Ready; Service Exists",
            }
        ],
    },
}


def sha8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


# -- BatchSandbox -----------------------------------------------------------------


def test_batchsandbox_example_is_ready() -> None:
    """The documented example resolves to its first endpoint, token and generation."""
    record = record_from_batchsandbox(EXAMPLE_BATCHSANDBOX)
    assert record == SandboxRecord(
        name="sbx-7f3a9c",
        namespace="opensandbox",
        endpoint="10.244.1.5",
        ready=True,
        not_ready_reason="",
        secure_access_token="tok-9c1e0b6d",
        generation="5b0f3c7e-8f1d-4c55-9b7a-2d3b1c0e9a11/481516",
        incarnation="5b0f3c7e-8f1d-4c55-9b7a-2d3b1c0e9a11",
    )
    assert record.require_ready() == "10.244.1.5"


@pytest.mark.parametrize(
    ("changes", "endpoint", "reason"),
    [
        ({"ready": 2}, "10.0.0.1", ""),
        ({"endpoints": ["10.0.0.1", "10.0.0.2"]}, "10.0.0.1", ""),
        ({"endpoints": [" 10.0.0.1 "]}, "10.0.0.1", ""),
        ({"endpoints": ["sbx.example.svc"]}, "sbx.example.svc", ""),
        ({"ready": 0}, "10.0.0.1", "status.ready is 0, needs >= 1"),
        ({"ready": -1}, "10.0.0.1", "status.ready is -1, needs >= 1"),
        ({"ready": None}, "10.0.0.1", "status.ready is missing, needs >= 1"),
        ({"ready": True}, "10.0.0.1", "status.ready is not an integer"),
        ({"ready": "1"}, "10.0.0.1", "status.ready is not an integer"),
        ({"ready": 1.0}, "10.0.0.1", "status.ready is not an integer"),
        ({"endpoints": None}, None, f"annotation {ENDPOINTS} is missing"),
        ({"raw_endpoints": ""}, None, f"annotation {ENDPOINTS} is empty"),
        ({"raw_endpoints": "  "}, None, f"annotation {ENDPOINTS} is empty"),
        ({"raw_endpoints": "10.0.0.1"}, None, f"annotation {ENDPOINTS} is not valid JSON"),
        ({"raw_endpoints": "[" * 100_000}, None, f"annotation {ENDPOINTS} is not valid JSON"),
        (
            {"raw_endpoints": '"10.0.0.1"'},
            None,
            f"annotation {ENDPOINTS} is not a JSON array of strings",
        ),
        (
            {"raw_endpoints": '{"ip": "x"}'},
            None,
            f"annotation {ENDPOINTS} is not a JSON array of strings",
        ),
        ({"raw_endpoints": "[1]"}, None, f"annotation {ENDPOINTS} is not a JSON array of strings"),
        (
            {"raw_endpoints": '["10.0.0.1", null]'},
            None,
            f"annotation {ENDPOINTS} is not a JSON array of strings",
        ),
        ({"endpoints": []}, None, f"annotation {ENDPOINTS} is an empty array"),
        ({"endpoints": [""]}, None, f"annotation {ENDPOINTS}: first endpoint is empty"),
        ({"endpoints": ["", "10.0.0.2"]}, None, f"annotation {ENDPOINTS}: first endpoint is empty"),
        (
            {"endpoints": ["10.0.0.1/x"]},
            None,
            f"annotation {ENDPOINTS}: first endpoint is not a valid host",
        ),
        (
            {"endpoints": ["u@10.0.0.1"]},
            None,
            f"annotation {ENDPOINTS}: first endpoint is not a valid host",
        ),
        (
            {"ready": 0, "endpoints": None},
            None,
            f"status.ready is 0, needs >= 1; annotation {ENDPOINTS} is missing",
        ),
    ],
)
def test_batchsandbox_readiness(changes: dict[str, Any], endpoint: str | None, reason: str) -> None:
    """Ready needs ready >= 1 and a JSON array of strings; the reason names every problem."""
    record = record_from_batchsandbox(make_batchsandbox("sbx", **changes))
    assert record.endpoint == endpoint
    assert record.not_ready_reason == reason
    assert record.ready is (reason == "")


def test_batchsandbox_without_status_is_not_ready() -> None:
    """A freshly created resource (no status yet) is not ready, with the reason."""
    obj = make_batchsandbox("sbx")
    del obj["status"]
    record = record_from_batchsandbox(obj)
    assert not record.ready
    assert record.not_ready_reason == "status.ready is missing, needs >= 1"
    with pytest.raises(SandboxNotReady, match="status.ready is missing"):
        record.require_ready()


def test_batchsandbox_status_not_an_object() -> None:
    """A status of the wrong shape makes the sandbox not ready, not skipped."""
    obj = make_batchsandbox("sbx")
    obj["status"] = ["ready"]
    assert record_from_batchsandbox(obj).not_ready_reason == "status is not an object"


@pytest.mark.parametrize(
    ("token", "expected"),
    [(None, None), ("", None), ("   ", None), ("tok", "tok"), ("  tok \n", "tok")],
)
def test_secure_access_token_is_trimmed(token: str | None, expected: str | None) -> None:
    """The access token is trimmed; blank or absent means no secure access."""
    for convert, build in (
        (record_from_batchsandbox, make_batchsandbox),
        (record_from_agentsandbox, make_agentsandbox),
    ):
        assert convert(build("sbx", token=token)).secure_access_token == expected


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"uid": "u", "resourceVersion": "7"}, "u/7"),
        ({"uid": "u"}, "u/"),
        ({}, "/"),
    ],
)
def test_generation_is_uid_and_resource_version(metadata: dict[str, str], expected: str) -> None:
    """The generation changes with the uid (recreated) and the resourceVersion (modified)."""
    obj = make_batchsandbox("sbx")
    obj["metadata"].update(metadata)
    assert record_from_batchsandbox(obj).generation == expected


def test_namespace_is_optional() -> None:
    """An object without a namespace (cluster-scoped) gets the empty namespace."""
    obj = make_batchsandbox("sbx")
    del obj["metadata"]["namespace"]
    assert record_from_batchsandbox(obj).key == ("", "sbx")


def _malformed_cases() -> list[Any]:
    def mutated(change: Any) -> dict[str, Any]:
        obj = make_batchsandbox("sbx", token="t")
        change(obj)
        return obj

    return [
        pytest.param(["not", "an", "object"], id="list"),
        pytest.param(None, id="null"),
        pytest.param(mutated(lambda o: o.pop("metadata")), id="no-metadata"),
        pytest.param(mutated(lambda o: o.update(metadata="x")), id="metadata-string"),
        pytest.param(mutated(lambda o: o["metadata"].pop("name")), id="no-name"),
        pytest.param(mutated(lambda o: o["metadata"].update(name="")), id="empty-name"),
        pytest.param(mutated(lambda o: o["metadata"].update(name=42)), id="name-int"),
        pytest.param(mutated(lambda o: o["metadata"].update(namespace=["a"])), id="namespace-list"),
        pytest.param(mutated(lambda o: o["metadata"].update(uid=1)), id="uid-int"),
        pytest.param(mutated(lambda o: o["metadata"].update(resourceVersion=5)), id="rv-int"),
        pytest.param(
            mutated(lambda o: o["metadata"].update(annotations=["a"])), id="annotations-list"
        ),
        pytest.param(
            mutated(lambda o: o["metadata"]["annotations"].update({TOKEN: 1})), id="token-int"
        ),
    ]


@pytest.mark.parametrize("obj", _malformed_cases())
def test_malformed_objects_raise_malformed_object(obj: Any) -> None:
    """Unusable metadata raises MalformedObject (the source skips the object)."""
    with pytest.raises(MalformedObject):
        record_from_batchsandbox(obj)
    with pytest.raises(MalformedObject):
        record_from_agentsandbox(obj)


def test_malformed_token_is_not_echoed() -> None:
    """Error messages name the field but never contain annotation values."""
    obj = make_batchsandbox("sbx")
    obj["metadata"]["annotations"][TOKEN] = ["s3cret"]
    with pytest.raises(MalformedObject) as info:
        record_from_batchsandbox(obj)
    assert "s3cret" not in str(info.value)
    assert TOKEN in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    metadata=st.dictionaries(
        st.sampled_from(["name", "namespace", "uid", "resourceVersion", "annotations"]),
        json_values | st.just("sbx"),
    ),
    annotations=st.dictionaries(st.sampled_from([ENDPOINTS, TOKEN, "other"]), json_values),
    status=json_values,
)
def test_arbitrary_objects_convert_or_raise_malformed(
    metadata: dict[str, Any], annotations: dict[str, Any], status: Any
) -> None:
    """Whatever the API sends, conversion returns a record or raises MalformedObject."""
    metadata.setdefault("annotations", annotations)
    obj = {"metadata": metadata, "status": status}
    for convert in (record_from_batchsandbox, record_from_agentsandbox):
        try:
            record = convert(obj)
        except MalformedObject:
            continue
        assert record.ready == (record.not_ready_reason == "")
        assert not record.ready or record.endpoint


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
def test_batchsandbox_endpoint_is_first_element(endpoints: list[str]) -> None:
    """Any JSON array of strings: the endpoint is the trimmed first element (when a host)."""
    record = record_from_batchsandbox(make_batchsandbox("sbx", endpoints=endpoints))
    first = endpoints[0].strip()
    if record.ready:
        assert record.endpoint == first
    else:
        assert "first endpoint" in record.not_ready_reason


# -- agent-sandbox ----------------------------------------------------------------


def test_agentsandbox_example_is_ready() -> None:
    """The documented example resolves to its service FQDN."""
    record = record_from_agentsandbox(EXAMPLE_AGENTSANDBOX)
    assert record == SandboxRecord(
        name="sandbox-4f2a1b",
        namespace="opensandbox",
        endpoint="sandbox-4f2a1b.opensandbox.svc.cluster.local",
        ready=True,
        not_ready_reason="",
        secure_access_token=None,
        generation="0c9e7d21-3a44-4b1e-8d90-6a1f2b3c4d5e/99120",
        incarnation="0c9e7d21-3a44-4b1e-8d90-6a1f2b3c4d5e",
    )


def _agent(status: Any) -> dict[str, Any]:
    obj = make_agentsandbox("sandbox-x")
    obj["status"] = status
    return obj


@pytest.mark.parametrize(
    ("obj", "endpoint", "reason"),
    [
        (_agent(None), None, "status is missing"),
        (_agent("Ready"), None, "status is not an object"),
        (_agent({"serviceFQDN": "x.svc"}), "x.svc", "status.conditions is missing"),
        (
            _agent({"serviceFQDN": "x.svc", "conditions": {}}),
            "x.svc",
            "status.conditions is not a list",
        ),
        (
            _agent(
                {
                    "serviceFQDN": "x.svc",
                    "conditions": ["Ready", {"type": "Other", "status": "True"}],
                }
            ),
            "x.svc",
            "condition Ready is missing",
        ),
        (
            _agent(
                {
                    "serviceFQDN": "x.svc",
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "DependenciesNotReady",
                            "message": "Pod is not\nReady",
                        }
                    ],
                }
            ),
            "x.svc",
            "condition Ready is False (DependenciesNotReady: Pod is not Ready)",
        ),
        (
            _agent(
                {"serviceFQDN": "x.svc", "conditions": [{"type": "Ready", "status": "Unknown"}]}
            ),
            "x.svc",
            "condition Ready is Unknown",
        ),
        (
            _agent({"serviceFQDN": "", "conditions": [{"type": "Ready", "status": "True"}]}),
            None,
            "status.serviceFQDN is empty",
        ),
        (
            _agent({"conditions": [{"type": "Ready", "status": "True"}]}),
            None,
            "status.serviceFQDN is empty",
        ),
        (
            _agent({"serviceFQDN": " x.svc ", "conditions": [{"type": "Ready", "status": "True"}]}),
            "x.svc",
            "",
        ),
        (
            _agent({"serviceFQDN": 5, "conditions": [{"type": "Ready", "status": True}]}),
            None,
            "condition Ready is unknown; status.serviceFQDN is empty",
        ),
    ],
)
def test_agentsandbox_readiness(obj: dict[str, Any], endpoint: str | None, reason: str) -> None:
    """Ready needs condition Ready=True and a service FQDN; the reason says what is missing."""
    record = record_from_agentsandbox(obj)
    assert record.endpoint == endpoint
    assert record.not_ready_reason == reason
    assert record.ready is (reason == "")


# -- DNS-1035 names and candidates ----------------------------------------------------


@pytest.mark.parametrize(
    ("sandbox_id", "expected"),
    [
        ("abc", "abc"),
        ("ABC", "abc"),
        ("MixedCase-Id", "mixedcase-id"),
        ("  my_sandbox.01  ", "my-sandbox-01"),
        ("a--b__c", "a-b-c"),
        ("-abc-", "abc"),
        ("123", "sandbox-123"),
        ("9abc", "sandbox-9abc"),
        ("-9abc", "sandbox-9abc"),
        ("sandbox-abc", "sandbox-abc"),
        ("Sandbox-ABC", "sandbox-abc"),
        ("!!!", f"sandbox-{sha8('!!!')}"),
        ("", f"sandbox-{sha8('')}"),
        ("   ", f"sandbox-{sha8('   ')}"),
        ("ÄÖÜ", f"sandbox-{sha8('ÄÖÜ')}"),
        ("Ünïcode", "n-code"),
        ("a" * 63, "a" * 63),
        ("a" * 64, "a" * 54 + "-" + sha8("a" * 64)),
        ("A" * 64, "a" * 54 + "-" + sha8("A" * 64)),
        ("a" * 53 + "-b" + "c" * 20, "a" * 53 + "-" + sha8("a" * 53 + "-b" + "c" * 20)),
        ("1" * 63, "sandbox-" + "1" * 46 + "-" + sha8("1" * 63)),
        ("1" * 56, "sandbox-" + "1" * 46 + "-" + sha8("1" * 56)),
        ("1" * 55, "sandbox-" + "1" * 55),
    ],
)
def test_dns1035_name(sandbox_id: str, expected: str) -> None:
    """The DNS-1035 form follows SPEC 4.2 step by step."""
    assert dns1035_name(sandbox_id) == expected


def test_dns1035_suffix_uses_sha256_of_the_original_id() -> None:
    """The suffix hashes the id as given (untrimmed, original case), like the server."""
    assert dns1035_name(" " * 3) != dns1035_name("")
    assert dns1035_name("A" * 64) != dns1035_name("a" * 64)


@given(st.text())
def test_dns1035_name_is_a_valid_label(sandbox_id: str) -> None:
    """Any id maps to a DNS-1035 label of at most 63 characters."""
    name = dns1035_name(sandbox_id)
    assert DNS1035.fullmatch(name)
    assert len(name) <= 63


@given(st.text())
def test_dns1035_name_is_idempotent(sandbox_id: str) -> None:
    """Normalising a normalised name changes nothing (the output is a valid label)."""
    name = dns1035_name(sandbox_id)
    assert dns1035_name(name) == name


@given(st.from_regex(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True))
def test_valid_labels_map_to_themselves(label: str) -> None:
    """An id that is already a DNS-1035 label (without '--') is its own name."""
    if "--" in label:
        # Runs of '-' collapse; SPEC 4.2 applies that even to valid labels.
        assert dns1035_name(label) == re.sub("-+", "-", label)
    else:
        assert dns1035_name(label) == label


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,40}", fullmatch=True))
def test_case_does_not_matter_for_short_ids(sandbox_id: str) -> None:
    """Short alphanumeric ids map to the same name whatever their case."""
    assert dns1035_name(sandbox_id) == dns1035_name(sandbox_id.lower()) == sandbox_id.lower()


@given(st.text(alphabet="abc-_.", min_size=0, max_size=20), st.text(min_size=1, max_size=5))
def test_long_ids_sharing_a_prefix_stay_distinct(tail: str, other: str) -> None:
    """Truncated names keep distinct ids apart through the hash suffix."""
    prefix = "x" * 70
    a, b = prefix + tail, prefix + tail + other
    assert dns1035_name(a) != dns1035_name(b)


@pytest.mark.parametrize(
    ("sandbox_id", "expected"),
    [
        ("abc", ["abc", "sandbox-abc"]),
        ("ABC", ["abc", "ABC", "sandbox-ABC"]),
        ("My.Box", ["my-box", "My.Box", "sandbox-My.Box"]),
        ("sandbox-abc", ["sandbox-abc"]),
        ("sandbox-ABC", ["sandbox-abc", "sandbox-ABC"]),
        ("123", ["sandbox-123", "123"]),
        ("4f2a1b", ["sandbox-4f2a1b", "4f2a1b"]),
        ("", [f"sandbox-{sha8('')}", "sandbox-"]),
    ],
)
def test_name_candidates(sandbox_id: str, expected: list[str]) -> None:
    """Candidates: DNS-1035 form, the id, sandbox-{id}; deduplicated, in order."""
    assert name_candidates(sandbox_id) == expected


@given(st.text())
def test_name_candidates_start_with_dns1035_and_have_no_duplicates(sandbox_id: str) -> None:
    """The first candidate is the DNS-1035 form; no candidate repeats."""
    candidates = name_candidates(sandbox_id)
    assert candidates[0] == dns1035_name(sandbox_id)
    assert len(candidates) == len(set(candidates))
    assert "" not in candidates


def test_registry_resolves_agent_sandbox_by_candidates() -> None:
    """The example agent sandbox is found by its short id and by its resource name."""
    registry = SandboxRegistry(candidates=name_candidates)
    registry.replace_all([record_from_agentsandbox(EXAMPLE_AGENTSANDBOX)])
    for sandbox_id in ("4f2a1b", "sandbox-4f2a1b"):
        assert registry.lookup(sandbox_id).endpoint == (
            "sandbox-4f2a1b.opensandbox.svc.cluster.local"
        )


def test_kinds_name_their_resources() -> None:
    """Each converter module names the group, version and plural it reads."""
    assert (batchsandbox.GROUP, batchsandbox.VERSION, batchsandbox.PLURAL) == (
        "sandbox.opensandbox.io",
        "v1alpha1",
        "batchsandboxes",
    )
    assert (agentsandbox.GROUP, agentsandbox.VERSION, agentsandbox.PLURAL) == (
        "agents.x-k8s.io",
        "v1alpha1",
        "sandboxes",
    )
    assert batchsandbox.BATCHSANDBOX_KIND.to_record is record_from_batchsandbox
    assert agentsandbox.AGENTSANDBOX_KIND.to_record is record_from_agentsandbox
    assert json.loads(EXAMPLE_BATCHSANDBOX["metadata"]["annotations"][ENDPOINTS]) == ["10.244.1.5"]
