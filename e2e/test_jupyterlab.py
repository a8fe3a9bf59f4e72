"""
JupyterLab in a real browser, through a real ingress, in both routing modes.

JupyterLab (with its default origin policy: no C{allow_origin}) is the
sandbox; Debian's Chromium, driven by Playwright, is the user; the ingress
runs as a real C{twistd} process on the file provider.  In each mode the
browser opens C{/lab}, runs C{print(6*7)} in a notebook and sees C{42},
runs a command in a terminal and sees its output, uploads a 5 MiB file
through the file browser (byte-exact on the sandbox's disk) and downloads
it again (byte-exact in the browser's download).  A failed step saves a
screenshot and the processes' logs under a directory the failure names.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from e2e.harness import MODES, TOKEN, Ingress, Jupyter, Mode, launch_chromium, wait_for

#: Seconds for a step the page drives (loading the app, starting a kernel).
STEP_S = 90
UPLOAD_BYTES = 5 * 1024 * 1024

expect.set_options(timeout=STEP_S * 1000)


@pytest.fixture(params=MODES, ids=[m.name for m in MODES])
def mode(request: Any) -> Mode:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def artifacts(workdir: Path, mode: Mode) -> Path:
    """Where screenshots and logs go; named in any failure."""
    path = workdir / f"artifacts-{mode.name}"
    path.mkdir()
    return path


@pytest.fixture
def stack(workdir: Path, mode: Mode, artifacts: Path) -> Iterator[tuple[Jupyter, Ingress]]:
    """Jupyter and the ingress, both ready; stopped afterwards."""
    with open(artifacts / "jupyter.log", "wb") as jlog, open(
        artifacts / "ingress.log", "wb"
    ) as ilog:
        jupyter = Jupyter(workdir / "jupyter", mode, jlog)
        try:
            ingress = Ingress(workdir, mode, ilog)
            try:
                jupyter.wait_ready()
                ingress.wait_ready()
                yield jupyter, ingress
            finally:
                ingress.stop()
        finally:
            jupyter.stop()


@contextmanager
def step(page: Any, artifacts: Path, name: str) -> Iterator[None]:
    """Run one user-visible step; on failure, screenshot and say where."""
    try:
        yield
    except BaseException as e:
        shot = artifacts / f"{name}.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception as shot_error:  # the page itself may be gone
            shot = artifacts / f"(no screenshot: {shot_error})"
        raise AssertionError(
            f"step {name!r} failed: {e}\nscreenshot and logs in {artifacts} ({shot.name})"
        ) from e


def watch_kernel(ws: Any, replies: list[bytes]) -> None:
    """Collect the kernel_info replies a kernel channels WebSocket brings."""
    if "/channels" not in ws.url:
        return

    def received(frame: str | bytes) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        if b'"msg_type":"kernel_info_reply"' in data:
            replies.append(data)

    ws.on("framereceived", received)


def wait_on_page(page: Any, predicate: Any, timeout: float, what: str) -> None:
    """L{wait_for}, letting the page's events in between (the sync API delivers
    them only inside its own calls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        page.wait_for_timeout(50)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_jupyterlab_through_the_ingress(
    mode: Mode, stack: tuple[Jupyter, Ingress], artifacts: Path, workdir: Path
) -> None:
    """Notebook, terminal, 5 MiB upload and download all work through the ingress."""
    jupyter, ingress = stack
    base = mode.url(ingress.port, jupyter.port)
    payload = os.urandom(UPLOAD_BYTES)
    upload = workdir / "e2e-upload.bin"
    upload.write_bytes(payload)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.set_default_timeout(STEP_S * 1000)
            kernel_replies: list[bytes] = []
            page.on("websocket", lambda ws: watch_kernel(ws, kernel_replies))
            failed_requests: list[str] = []
            page.on(
                "response",
                lambda r: failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )

            with step(page, artifacts, "open-lab"):
                response = page.goto(f"{base}lab?token={TOKEN}")
                assert response is not None and response.status == 200
                expect(page.locator(".jp-LauncherCard").first).to_be_visible()

            with step(page, artifacts, "notebook"):
                page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
                editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
                expect(editor).to_be_visible()
                # A cell run before the page's kernel connection is up is
                # dropped by JupyterLab (the kernel may already show idle):
                # wait for the kernel's first reply over its WebSocket.
                wait_on_page(page, lambda: kernel_replies, STEP_S, "the kernel_info_reply")
                editor.click()
                page.keyboard.type("print(6*7)")
                page.keyboard.press("Shift+Enter")
                output = page.locator(".jp-NotebookPanel .jp-OutputArea-output").first
                expect(output).to_have_text("42")

            with step(page, artifacts, "terminal"):
                # The notebook took the launcher's place: open a new one.
                page.locator(".jp-FileBrowser [data-command='launcher:create']").first.click()
                page.locator(
                    '.jp-LauncherCard[data-category="Other"][title="Start a new terminal session"]'
                ).first.click()
                launcher_or_terminal = page.locator(".jp-Terminal .xterm")
                expect(launcher_or_terminal).to_be_visible()
                rows = page.locator(".jp-Terminal .xterm-accessibility-tree")
                # A prompt means the shell is there to read the command.
                expect(rows).to_contain_text("#" if os.geteuid() == 0 else "$")
                launcher_or_terminal.click()
                page.keyboard.type("echo e2e-$((6*7))-done\n")
                # The output, not the echoed command line: the shell computed it.
                expect(rows).to_contain_text("e2e-42-done")

            with step(page, artifacts, "upload"):
                # The file browser is open by default; its tab toggles it.
                if not page.locator(".jp-FileBrowser").first.is_visible():
                    page.locator(".jp-SideBar [data-id='filebrowser']").first.click()
                with page.expect_file_chooser() as chooser:
                    page.locator(".jp-FileBrowser .jp-id-upload").first.click()
                chooser.value.set_files(str(upload))
                on_disk = jupyter.root / upload.name
                wait_for(
                    lambda: on_disk.exists() and on_disk.stat().st_size == UPLOAD_BYTES,
                    STEP_S,
                    f"{on_disk} to hold {UPLOAD_BYTES} bytes",
                )
                assert sha256(on_disk.read_bytes()) == sha256(payload)
                item = page.locator(f".jp-DirListing-item[title^='Name: {upload.name}']")
                expect(item).to_be_visible()

            with step(page, artifacts, "download"):
                item.click(button="right")
                with page.expect_download() as download:
                    page.locator(
                        ".lm-Menu-item[data-command='filebrowser:download']"
                    ).first.click()
                saved = workdir / "downloaded.bin"
                download.value.save_as(str(saved))
                assert download.value.failure() is None
                assert sha256(saved.read_bytes()) == sha256(payload)

            # Nothing the page asked for was refused on the way (a 403 from
            # Jupyter's origin check, a 400/404 from a lost prefix).
            assert failed_requests == [], failed_requests
        finally:
            browser.close()
