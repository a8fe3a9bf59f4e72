"""The provider table: choices, validation and source construction come from its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IService, Service
from twisted.internet.task import Clock

from opensandbox_ingress.config import ConfigError, IngressConfig
from opensandbox_ingress.options import IngressOptions, config_from_options
from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry
from opensandbox_ingress.sources import build_source, name_candidates_for, providers
from opensandbox_ingress.sources.agentsandbox import AGENTSANDBOX_KIND, name_candidates
from opensandbox_ingress.sources.batchsandbox import BATCHSANDBOX_KIND
from opensandbox_ingress.sources.file import FileSource
from opensandbox_ingress.sources.providers import (
    DEFAULT_PROVIDER,
    PROVIDERS,
    Provider,
    provider_named,
    provider_names,
)


def configure(*argv: str) -> IngressConfig:
    """Parse a command line the way the twistd plugin does."""
    options = IngressOptions()
    options.parseOptions(list(argv))
    return config_from_options(options)


class FakeSource(Service):
    """A source that records what it was built from."""

    def __init__(self, provider: Provider, config: IngressConfig, registry: SandboxRegistry) -> None:
        self.provider = provider
        self.config = config
        self.registry = registry


def build_fake(
    provider: Provider, config: IngressConfig, registry: SandboxRegistry, reactor: Any
) -> IService:
    """The fake row's source builder."""
    source: Any = FakeSource(provider, config, registry)
    return source  # type: ignore[no-any-return]


def fake_candidates(sandbox_id: str) -> Sequence[str]:
    """The fake row's name mapping: a prefix, then the id."""
    return (f"fake-{sandbox_id}", sandbox_id)


FAKE = Provider(
    "fake", build_fake, name_candidates=fake_candidates, required_settings=("kubeconfig",)
)


@pytest.fixture
def with_fake_row(monkeypatch: pytest.MonkeyPatch) -> Provider:
    """The table with one more row, for a provider that exists only here."""
    monkeypatch.setattr(providers, "PROVIDERS", (*PROVIDERS, FAKE))
    return FAKE


def test_builtin_rows_in_help_order() -> None:
    """The table lists batchsandbox, agent-sandbox and file, in that order."""
    assert provider_names() == ("batchsandbox", "agent-sandbox", "file")
    assert DEFAULT_PROVIDER in provider_names()


def test_builtin_rows_carry_their_kinds_and_name_mappings() -> None:
    """Each Kubernetes row names its resource; only agent-sandbox maps ids to other names."""
    assert provider_named("batchsandbox").kind is BATCHSANDBOX_KIND
    assert provider_named("agent-sandbox").kind is AGENTSANDBOX_KIND
    assert provider_named("file").kind is None
    assert provider_named("agent-sandbox").name_candidates is name_candidates
    assert list(provider_named("batchsandbox").name_candidates("Sbx_1")) == ["Sbx_1"]
    assert list(provider_named("file").name_candidates("Sbx_1")) == ["Sbx_1"]


def test_help_and_default_come_from_the_table() -> None:
    """--provider-type's default and its help text are the table's."""
    options = IngressOptions()
    (row,) = [p for p in options.optParameters if p[0] == "provider-type"]
    assert row[2] == DEFAULT_PROVIDER
    assert row[3] == "Sandbox source: batchsandbox, agent-sandbox or file."
    assert configure().provider_type == DEFAULT_PROVIDER


def test_unknown_provider_lists_the_rows(with_fake_row: Provider) -> None:
    """An unknown name is one --provider-type line listing every row, the added one included."""
    with pytest.raises(ConfigError) as caught:
        configure("--provider-type", "nope")
    assert str(caught.value) == (
        "--provider-type: unknown provider 'nope'; "
        "expected one of batchsandbox, agent-sandbox, file, fake"
    )


def test_added_row_is_accepted_and_builds_its_source(with_fake_row: Provider) -> None:
    """A row added to the table is a valid --provider-type whose builder makes the source."""
    config = configure("--provider-type", "fake", "--kubeconfig", "/k")
    assert config.provider_type == "fake"
    registry = SandboxRegistry(name_candidates_for(config))
    source: Any = build_source(config, registry, Clock())
    assert isinstance(source, FakeSource)
    assert source.provider is FAKE and source.config is config and source.registry is registry
    registry.replace_all([SandboxRecord(name="fake-abc", namespace="ns", endpoint="10.0.0.9")])
    assert registry.lookup("abc").endpoint == "10.0.0.9"


def test_added_row_required_setting(with_fake_row: Provider) -> None:
    """A row's required setting is enforced, named by its flag."""
    with pytest.raises(ConfigError) as caught:
        configure("--provider-type", "fake")
    assert str(caught.value) == "--kubeconfig: required with --provider-type fake"
    with pytest.raises(ConfigError):
        IngressConfig(provider_type="fake").validate()


def test_removed_row_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation reads the table: a provider taken out of it is refused."""
    monkeypatch.setattr(
        providers, "PROVIDERS", tuple(p for p in PROVIDERS if p.name != "agent-sandbox")
    )
    with pytest.raises(ConfigError) as caught:
        IngressConfig(provider_type="agent-sandbox").validate()
    assert caught.value.flag == "provider-type"


def test_file_row_builds_a_file_source(tmp_path: Path) -> None:
    """The file row builds a FileSource on --sandboxes-file."""
    path = tmp_path / "s.yaml"
    path.write_text("[]\n")
    config = configure("--provider-type", "file", "--sandboxes-file", str(path))
    source = build_source(config, SandboxRegistry(), Clock())
    assert isinstance(source, FileSource)


def test_kubernetes_rows_need_a_kind() -> None:
    """A Kubernetes-watching row without a resource kind is a programming error, said plainly."""
    broken = Provider("broken", providers.watch_resource)
    with pytest.raises(ValueError, match="no resource kind"):
        broken.build_source(broken, IngressConfig(), SandboxRegistry(), Clock())
