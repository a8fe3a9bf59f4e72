"""Fixtures of the browser end-to-end tests: a work directory kept on failure."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    # Lets the workdir fixture see whether its test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def workdir(request: Any) -> Iterator[Path]:
    """
    A directory of this test's own (not pytest's numbered tmp dirs, which
    other runs on a shared machine prune): kept, with its screenshots and
    logs, when the test fails; removed when it passes.
    """
    path = Path(tempfile.mkdtemp(prefix="opensandbox-ingress-e2e-"))
    yield path
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)
