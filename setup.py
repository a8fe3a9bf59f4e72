"""
Packaging.  Metadata lives in setup.cfg; this file adds the twistd plugin
module, which lives in the C{twisted.plugins} namespace (no __init__.py
there, on purpose: see
https://docs.twisted.org/en/stable/core/howto/plugin.html).
"""

from setuptools import setup
from setuptools.command.build_py import build_py


class _BuildPy(build_py):
    """Also installs twisted/plugins/opensandbox_ingress_plugin.py."""

    def run(self) -> None:
        super().run()
        self.mkpath(f"{self.build_lib}/twisted/plugins")
        self.copy_file(
            "twisted/plugins/opensandbox_ingress_plugin.py",
            f"{self.build_lib}/twisted/plugins/opensandbox_ingress_plugin.py",
        )


setup(cmdclass={"build_py": _BuildPy})
