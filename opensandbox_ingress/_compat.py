"""
What differs between the Pythons the ingress runs on: CPython 3.11+ and
PyPy 3.9 (Debian's C{pypy3}).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

#: Running on PyPy (whose GC treats large byte strings differently).
PYPY = platform.python_implementation() == "PyPy"

#: Keyword arguments for C{@dataclass} giving slotted records where the
#: interpreter supports it (3.10+); on 3.9 the records have a C{__dict__}.
DATACLASS_SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}
