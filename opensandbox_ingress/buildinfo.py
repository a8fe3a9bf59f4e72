"""
Build metadata: version, git commit and build time.

Set at build time, in this order of precedence: the environment variables
C{OPENSANDBOX_INGRESS_VERSION}, C{OPENSANDBOX_INGRESS_GIT_COMMIT},
C{OPENSANDBOX_INGRESS_BUILD_TIME} (the Dockerfile sets them from its build
args); then the generated C{_build_info} module, which setup.py writes into
every wheel and sdist it builds (from C{make build}'s C{VERSION},
C{GIT_COMMIT}, C{BUILD_TIME}; a plain C{pip install .} from a git checkout
bakes just the commit); then C{dev}/C{unknown}.  Running from the source
tree there is no generated module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The package's own version (what `pip` sees); the reported build version
#: defaults to C{dev} unless a build sets one.
PACKAGE_VERSION = "0.1.0"

#: The environment variables that override the baked values (the
#: Dockerfile's ENV names).
ENV_VERSION = "OPENSANDBOX_INGRESS_VERSION"
ENV_GIT_COMMIT = "OPENSANDBOX_INGRESS_GIT_COMMIT"
ENV_BUILD_TIME = "OPENSANDBOX_INGRESS_BUILD_TIME"


@dataclass(frozen=True)
class BuildInfo:
    """What was built, from which commit, when."""

    version: str
    git_commit: str
    build_time: str


def current() -> BuildInfo:
    """The build metadata of this installation; never raises."""
    baked = _baked()
    return BuildInfo(
        os.environ.get(ENV_VERSION) or baked.version,
        os.environ.get(ENV_GIT_COMMIT) or baked.git_commit,
        os.environ.get(ENV_BUILD_TIME) or baked.build_time,
    )


def _baked() -> BuildInfo:
    """The generated module's values, else dev/unknown."""
    try:
        from . import _build_info  # type: ignore[attr-defined]
    except Exception:
        # Absent (source tree, editable install) or damaged: the start-up
        # line must not be what stops the service.
        return BuildInfo("dev", "unknown", "unknown")

    def field(name: str, default: str) -> str:
        value = getattr(_build_info, name, None)
        return value if isinstance(value, str) and value else default

    return BuildInfo(
        field("VERSION", "dev"), field("GIT_COMMIT", "unknown"), field("BUILD_TIME", "unknown")
    )
