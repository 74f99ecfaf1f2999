"""Start the real Cog server (coglet) on 127.0.0.1 with a given weights folder, for tests.

    from cogserver import cog_server                # tests/ is on sys.path under pytest

    with cog_server(weights_folder) as server:      # waits for READY or SETUP_FAILED (bounded)
        assert server.status == "READY"
        code, body = server.predict({"prompt": "猫", "seed": 1})

The server runs in a temporary working directory holding its own ``.cog/openapi_schema.json`` (written
by :mod:`jsd.coghttp.local` from the predictor), in its own process group, and is always killed on exit.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from repofiles import load_repo_module

from jsd.coghttp import client, local

SETUP_TIMEOUT = 240.0  # seconds: importing torch/diffusers on 2 busy cores is most of it


cog_local = load_repo_module("scripts/cog_local.py")  # the command line, for the tests of its commands


@dataclass
class CogServer:
    """A running coglet: its URL, its health at the end of setup, and small HTTP helpers."""

    url: str
    status: str  # "READY" or "SETUP_FAILED" once the context manager yields
    setup: dict
    log_path: Path

    def health(self) -> dict:
        return client.health(self.url)

    def settled_status(self, *, timeout: float = 10) -> str:
        """Health status once a finished prediction has freed its slot (coglet frees it a moment
        after answering), or whatever it still is after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status = self.health()["status"]
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.health()["status"]
        return status

    def predict(self, inputs: dict, *, timeout: float = 300, wait_if_busy: float = 10) -> tuple[int, dict]:
        """Synchronous ``POST /predictions``: (HTTP status, JSON body).

        coglet answers a prediction a moment before it frees its slot, so a request sent right after
        another can get 409; like any client of ours (``jsd.coghttp.client.post_json``), it is retried
        for up to ``wait_if_busy`` seconds (0: return the 409).
        """
        return client.post_prediction(self.url, inputs, timeout=timeout, retry_for=wait_if_busy)

    def train(self, inputs: dict, *, timeout: float = 300, wait_if_busy: float = 10) -> tuple[int, dict]:
        """Synchronous ``POST /trainings`` (a train-mode server): (HTTP status, JSON body); 409 retried as above."""
        return client.post_training(self.url, inputs, timeout=timeout, retry_for=wait_if_busy)

    def request(self, method: str, path: str, body: dict | None = None, *, timeout: float = 300) -> tuple[int, dict]:
        """Any request; the body is JSON-decoded where possible (``{"raw": text}`` otherwise)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _json(err.read())

    @contextmanager
    def running(self, kind: str, job_id: str, inputs: dict, *, timeout: float = 120) -> Iterator[dict]:
        """``PUT /{kind}/{job_id}`` (kind: predictions or trainings) in a thread; yields once health is BUSY.

        On exit the request is awaited (at most ``timeout`` s) and the yielded dict holds its ``response``,
        (HTTP status, JSON body). Lets a test cancel, or probe the server, while a job runs.
        """
        result: dict = {}

        def send() -> None:
            result["response"] = self.request("PUT", f"/{kind}/{job_id}", {"id": job_id, "input": inputs})

        thread = threading.Thread(target=send)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while self.health()["status"] != "BUSY" and time.monotonic() < deadline:
                time.sleep(0.1)
            yield result
        finally:
            thread.join(timeout=timeout)
        assert not thread.is_alive(), f"PUT /{kind}/{job_id} still running after {timeout} s"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def _json(raw: bytes) -> dict:
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {"raw": raw.decode(errors="replace")}


@contextmanager
def cog_server(
    weights: str | Path, *, setup_timeout: float = SETUP_TIMEOUT, train: bool = False
) -> Iterator[CogServer]:
    """coglet serving ``predict.py:Predictor`` with ``JSD_WEIGHTS=weights`` on a free 127.0.0.1 port.

    Yields once health is READY or SETUP_FAILED (check ``server.status``); raises if neither comes
    within ``setup_timeout`` seconds. The server and its worker are killed on exit, always.
    ``train``: coglet in train mode serving ``train.py:train`` (``POST /trainings``) instead.
    """
    with tempfile.TemporaryDirectory(prefix="jsd-cog-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "coglet.log"
        with (
            open(log_path, "wb") as log,
            local.running_server(weights, workdir=workdir, log=log, train=train) as (url, proc),
        ):
            try:
                setup = client.wait_for_setup(url, proc, setup_timeout)
            except (TimeoutError, RuntimeError) as err:
                raise RuntimeError(
                    f"{err}\n--- coglet log ---\n{log_path.read_text(errors='replace')[-4000:]}"
                ) from err
            yield CogServer(url=url, status=setup["status"], setup=setup, log_path=log_path)
