"""
L{ConfigError}, the one error type of an unusable configuration.

A leaf module (it imports nothing of the package), so that modules which
L{opensandbox_ingress.config} itself reaches, such as the source builders
named by the provider table, can raise it without an import cycle.
L{opensandbox_ingress.config} re-exports it; import it from there.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """
    A configuration value is unusable.

    C{str(error)} is the one line shown to the operator; it starts with the
    flag's name.
    """

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"--{flag}: {problem}")
        self.flag = flag
        self.problem = problem
