"""
Packaging.  Metadata lives in setup.cfg; this file adds two build steps.

1. The twistd plugin module, which lives in the C{twisted.plugins} namespace
   (no __init__.py there, on purpose: see
   https://docs.twisted.org/en/stable/core/howto/plugin.html), is copied into
   the build and added to the sdist (setuptools' default file list misses it,
   and a wheel built from that sdist would have no plugin).

2. Build metadata is baked into C{opensandbox_ingress/_build_info.py}, which
   L{opensandbox_ingress.buildinfo} reads.  The module is written into the
   build directory and the sdist's release tree, never into the source tree.
   Each value is, in order: the environment variable C{VERSION},
   C{GIT_COMMIT} or C{BUILD_TIME} (C{make build} sets all three); the value
   baked into the sdist being built from; for the commit, C{git rev-parse
   HEAD} when building from a git checkout; then C{dev}/C{unknown}.  Nothing
   here can fail a build: a missing git just means C{unknown}.
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PLUGIN = "twisted/plugins/opensandbox_ingress_plugin.py"
BUILD_INFO = "opensandbox_ingress/_build_info.py"
#: (name, default) of each baked value; the name is also the build-time
#: environment variable.
FIELDS = (("VERSION", "dev"), ("GIT_COMMIT", "unknown"), ("BUILD_TIME", "unknown"))


def _baked_in_source() -> dict[str, str]:
    """
    The values of a C{_build_info.py} already in the tree being built: there
    is one in an sdist made by C{make build}, none in a git checkout.  Read
    with C{ast}, not executed.
    """
    try:
        tree = ast.parse((HERE / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    values = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            values[node.targets[0].id] = node.value.value
    return values


def _git_commit() -> str | None:
    """C{git rev-parse HEAD} of this checkout, or None (not a checkout, no git)."""
    # Only our own checkout: an sdist unpacked somewhere inside another
    # repository must not report that repository's commit.
    if not (HERE / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def build_info_values() -> dict[str, str]:
    """The metadata to bake, by the precedence in the module docstring."""
    baked = _baked_in_source()
    values = {}
    for name, default in FIELDS:
        value = os.environ.get(name) or baked.get(name)
        if not value and name == "GIT_COMMIT":
            value = _git_commit()
        values[name] = value or default
    return values


def write_build_info(path: Path, values: dict[str, str]) -> None:
    """Write the generated module at C{path}."""
    # Unlink first: the sdist release tree hard-links source files, and a
    # write through a link would change the source tree.
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Generated at build time by setup.py; do not edit.\n"]
    lines += [f"{name} = {values[name]!r}\n" for name, _ in FIELDS]
    path.write_text("".join(lines), encoding="utf-8")


class _BuildPy(build_py):
    """Also installs the twistd plugin and the baked build metadata."""

    def run(self) -> None:
        super().run()
        self.mkpath(f"{self.build_lib}/twisted/plugins")
        self.copy_file(PLUGIN, f"{self.build_lib}/{PLUGIN}")
        # An editable install runs from the source tree, which has no
        # metadata module: it reports dev/unknown (or the environment's).
        if not getattr(self, "editable_mode", False):
            write_build_info(Path(self.build_lib) / BUILD_INFO, build_info_values())


class _Sdist(sdist):
    """Adds the twistd plugin and the baked build metadata to the sdist."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        if PLUGIN not in files:
            files = [*files, PLUGIN]
        super().make_release_tree(base_dir, files)
        write_build_info(Path(base_dir) / BUILD_INFO, build_info_values())


setup(cmdclass={"build_py": _BuildPy, "sdist": _Sdist})
