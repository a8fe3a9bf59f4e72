"""The embedding API is what opensandbox_ingress exports; pin it."""

from __future__ import annotations

import opensandbox_ingress


def test_public_names_are_pinned() -> None:
    """The package exports exactly the documented embedding API."""
    assert sorted(opensandbox_ingress.__all__) == [
        "ConfigError",
        "IngressConfig",
        "IngressError",
        "IngressService",
        "RenewIntentConfig",
        "SandboxRecord",
        "SandboxRegistry",
        "build_ingress",
    ]
    for name in opensandbox_ingress.__all__:
        assert getattr(opensandbox_ingress, name) is not None


def test_build_ingress_validates_config() -> None:
    """build_ingress rejects an invalid configuration with ConfigError naming the flag."""
    import pytest

    with pytest.raises(opensandbox_ingress.ConfigError, match="^--mode:"):
        opensandbox_ingress.build_ingress(opensandbox_ingress.IngressConfig(mode="path"))  # type: ignore[arg-type]
