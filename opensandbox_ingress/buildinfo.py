"""
Build metadata: version, git commit and build time.

Set at build time, in this order of precedence: the environment variables
C{OPENSANDBOX_INGRESS_VERSION}, C{OPENSANDBOX_INGRESS_GIT_COMMIT},
C{OPENSANDBOX_INGRESS_BUILD_TIME} (the Dockerfile sets them from its build
args); then a generated C{_build_info} module (written by a metadata-baking
build); then C{dev}/C{unknown}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The package's own version (what `pip` sees); the reported build version
#: defaults to C{dev} unless a build sets one.
PACKAGE_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildInfo:
    """What was built, from which commit, when."""

    version: str
    git_commit: str
    build_time: str


def current() -> BuildInfo:
    """The build metadata of this installation."""
    try:
        from . import _build_info  # type: ignore[attr-defined]

        baked = BuildInfo(
            getattr(_build_info, "VERSION", "dev"),
            getattr(_build_info, "GIT_COMMIT", "unknown"),
            getattr(_build_info, "BUILD_TIME", "unknown"),
        )
    except ImportError:
        baked = BuildInfo("dev", "unknown", "unknown")
    return BuildInfo(
        os.environ.get("OPENSANDBOX_INGRESS_VERSION") or baked.version,
        os.environ.get("OPENSANDBOX_INGRESS_GIT_COMMIT") or baked.git_commit,
        os.environ.get("OPENSANDBOX_INGRESS_BUILD_TIME") or baked.build_time,
    )
