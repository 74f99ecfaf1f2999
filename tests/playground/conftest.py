"""Fixtures of the browser tests (``make playground-test``): one coglet, one playground, one headless Chromium.

The tests carry the ``browser`` marker, which ``make test`` deselects (pyproject.toml ``addopts``): they need
Debian's Chromium at /usr/bin/chromium (``make playground-test`` installs it when missing) and take minutes.
Screenshots go to ``build/playground-test/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from _chromium import CHROMIUM_FLAGS  # benchmarks/, on sys.path (pyproject.toml's pytest pythonpath)
from repofiles import REPO

from jsd.coghttp import client, local

CHROMIUM = Path("/usr/bin/chromium")
OUT = REPO / "build" / "playground-test"
SETUP_TIMEOUT = 240.0
PAGE_TIMEOUT = 180.0  # seconds: the playground's start (importing gradio on 2 busy cores) and one page load


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    weights: Path
    workdir: Path
    log: Path
    stack: contextlib.ExitStack

    def stop(self) -> None:
        local.stop_server(self.process)

    def kill(self) -> None:
        """The server dies at once (SIGKILL to coglet and its worker), as a crash or an OOM kill does."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def restart(self) -> None:
        """A new coglet on the same port (the playground keeps its URL), READY when this returns."""
        port = int(self.url.rsplit(":", 1)[1])
        log = self.stack.enter_context(open(self.log, "ab"))  # noqa: SIM115 (closed with the stack)
        url, self.process = self.stack.enter_context(
            local.running_server(self.weights, workdir=self.workdir, port=port, log=log)
        )
        state = client.wait_for_setup(url, self.process, SETUP_TIMEOUT)
        assert state["status"] == "READY", state

    def settled_status(self, timeout: float = 30) -> str:
        """Health once a finished or canceled prediction has freed the slot (coglet frees it a moment later)."""
        deadline = time.monotonic() + timeout
        status = client.health(self.url)["status"]
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = client.health(self.url)["status"]
        return status


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory, output_dir):
    """coglet serving the tiny checkpoint on a free loopback port: the one server of all the browser tests."""
    workdir = tmp_path_factory.mktemp("cog")
    with (
        contextlib.ExitStack() as stack,
        open(output_dir / "coglet.log", "wb") as log,
        local.running_server(tiny_checkpoint, workdir=workdir, log=log) as (url, process),
    ):
        state = client.wait_for_setup(url, process, SETUP_TIMEOUT)
        assert state["status"] == "READY", state
        yield Server(url, process, Path(tiny_checkpoint), workdir, output_dir / "coglet.log", stack)


@pytest.fixture(scope="session")
def playground(server, output_dir, tmp_path_factory) -> str:
    """``python -m jsd playground --api SERVER`` on a free port; its URL. Stopped (SIGTERM) at the end, after
    which its temporary folder (TMPDIR, its own here) must be empty: no ``gradio/`` upload cache left behind."""
    port = client.free_port()
    tmp = tmp_path_factory.mktemp("playground-tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    env.pop("GRADIO_TEMP_DIR", None)
    with open(output_dir / "playground.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jsd", "playground", "--api", server.url, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_page(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert sorted(path.name for path in tmp.iterdir()) == [], "left behind by the playground"


def _wait_for_page(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + PAGE_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the playground exited with {process.returncode}; see {OUT / 'playground.log'}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the playground did not answer at {url} within {PAGE_TIMEOUT:.0f} s")


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium (never a downloaded browser); each launch gets a fresh temporary profile."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: run `make playground-test`, which installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser, playground):
    """``open_page(locale="ja-JP")``: a new browser context (its own cookies and language) on the playground.

    ``open_page.requests`` lists every URL the pages asked for, from the first request of each page on.
    """
    contexts = []

    def opener(locale: str = "ja-JP"):
        context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
        context.on("request", lambda request: opener.requests.append(request.url))
        context.set_default_timeout(PAGE_TIMEOUT * 1000)
        contexts.append(context)
        page = context.new_page()
        page.goto(playground)
        page.wait_for_selector("#generate")
        page.wait_for_function("document.querySelector('#server-status')?.innerText.includes('127.0.0.1')")
        return page

    opener.requests = []
    yield opener
    for context in contexts:
        context.close()
