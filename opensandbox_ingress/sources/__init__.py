"""
Sandbox sources: services that feed a L{SandboxRegistry}.

A source is an C{IService}; once started it delivers a first snapshot with
C{registry.replace_all} (which marks the registry synced) and then single
events with C{registry.upsert} / C{registry.remove}, always on the reactor
thread.  Which source runs, and how sandbox ids map to resource names, is
read from the provider table (L{opensandbox_ingress.sources.providers}):
L{build_source} and L{name_candidates_for} look the configured provider up.
"""

from __future__ import annotations

from .providers import build_source, name_candidates_for

__all__ = ["build_source", "name_candidates_for"]
