"""A client of a Cog server (coglet 0.23): health, schema, predictions, trainings and cancel.

The protocol as coglet serves it (docs/serving.md):

- ``GET /health-check``: ``STARTING``, ``READY``, ``BUSY``, ``SETUP_FAILED``; ``GET /openapi.json``: the schema.
- ``POST /predictions`` (``/trainings`` in train mode) with ``{"input": ...}`` answers when it is done: 200 with
  ``status`` ``succeeded``, ``failed`` (``error``) or ``canceled``; 422 with ``detail[].loc/msg`` for a bad input.
- With ``Prefer: respond-async``, a client-chosen ``id``, a ``webhook`` URL and ``webhook_events_filter`` it
  answers 202 at once; coglet then POSTs the whole prediction object to the webhook on ``start``, on new
  ``logs`` and on ``completed``. ``GET /predictions/{id}`` is 405: the webhook is the only way to the result.
- ``POST /predictions/{id}/cancel`` stops it between two denoising steps (status ``canceled``).
- 409: another prediction or training holds the slot; every POST here goes through :func:`post_json`, which
  retries it.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

RETRY_FOR = 10.0  # seconds: the longest post_json keeps retrying a 409, in all
FIRST_BACKOFF = 0.05  # seconds before the first retry; doubled after each, up to MAX_BACKOFF
MAX_BACKOFF = 2.0
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]
FINAL_STATUSES = ("succeeded", "failed", "canceled")


class CogServerError(Exception):
    """The URL is not a Cog server, or nothing answers there: one line, naming the URL."""


def post_json(
    url: str,
    path: str,
    body: dict,
    timeout: float | None = None,
    *,
    retry_for: float = RETRY_FOR,
    log: Callable[[str], None] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """``POST url+path`` with a JSON body; returns the HTTP status and the JSON answer.

    A 409 ("At capacity": another prediction or training holds the slot) is retried with exponential
    backoff (50 ms, doubled up to 2 s, plus up to 20 % jitter) for at most ``retry_for`` seconds in all,
    then returned. coglet answers a synchronous request a moment *before* it frees its slot, so a
    request sent straight after a 200 can get a 409 even from a client that sends one at a time
    (``scripts/repro_coglet.py``). A 409 has done no work, so sending the request again is safe. Every
    other status is returned at once. ``log`` receives one line per retry (default: standard error).
    ``headers``: extra request headers (``Prefer: respond-async`` for an async prediction, answered 202).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    deadline = time.monotonic() + retry_for
    backoff = FIRST_BACKOFF
    attempt = 0
    while True:
        status, answer = _post_once(f"{url}{path}", body, timeout, headers)
        left = deadline - time.monotonic()
        if status != 409 or left <= 0:
            return status, answer
        attempt += 1
        wait = min(backoff * (1 + 0.2 * random.random()), left)
        log(f"{path}: 409 ({answer.get('error') or answer.get('detail') or 'busy'}); retry {attempt} in {wait:.2f} s")
        time.sleep(wait)
        backoff = min(backoff * 2, MAX_BACKOFF)


def _post_once(url: str, body: dict, timeout: float | None, headers: dict[str, str] | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | (headers or {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw.strip() else {}
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except json.JSONDecodeError:
            return err.code, {"detail": raw.decode(errors="replace")}


def post_prediction(
    url: str, inputs: dict, *, timeout: float | None = None, retry_for: float = RETRY_FOR, prediction_id: str = ""
) -> tuple[int, dict]:
    """``POST /predictions`` (synchronous), a 409 retried for up to ``retry_for`` s; (HTTP status, JSON body)."""
    body = {"id": prediction_id, "input": inputs} if prediction_id else {"input": inputs}
    return post_json(url, "/predictions", body, timeout, retry_for=retry_for)


def start_prediction(
    url: str, prediction_id: str, inputs: dict, webhook: str, *, timeout: float = 30, retry_for: float = RETRY_FOR
) -> tuple[int, dict]:
    """An async prediction (``Prefer: respond-async``): 202 when it runs, its events then go to ``webhook``."""
    body = {"id": prediction_id, "input": inputs, "webhook": webhook, "webhook_events_filter": WEBHOOK_EVENTS}
    return post_json(url, "/predictions", body, timeout, retry_for=retry_for, headers={"Prefer": "respond-async"})


def post_training(
    url: str, inputs: dict, *, timeout: float | None = None, retry_for: float = RETRY_FOR
) -> tuple[int, dict]:
    """``POST /trainings`` (synchronous), a 409 retried for up to ``retry_for`` s; (HTTP status, JSON body)."""
    return post_json(url, "/trainings", {"input": inputs}, timeout, retry_for=retry_for)


def cancel(url: str, prediction_id: str, *, timeout: float = 10) -> bool:
    """``POST /predictions/{id}/cancel``; False when the server could not be reached."""
    request = urllib.request.Request(
        f"{url}/predictions/{urllib.parse.quote(prediction_id)}/cancel", data=b"", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def health(url: str) -> dict:
    """``GET /health-check`` as JSON; ``{"status": "UNREACHABLE"}`` while the server is not listening."""
    try:
        with urllib.request.urlopen(f"{url}/health-check", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return {"status": "UNREACHABLE"}


def fetch_schema(url: str, *, timeout: float = 30) -> dict:
    """``GET /openapi.json``; :class:`CogServerError` (one line) when nothing answers or it is not JSON."""
    try:
        with urllib.request.urlopen(f"{url}/openapi.json", timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise CogServerError(f"{url}/openapi.json answered HTTP {err.code}: is this a Cog server?") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        raise CogServerError(f"no server answers at {url} ({getattr(err, 'reason', err)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CogServerError(f"{url}/openapi.json is not JSON: is this a Cog server?") from None


def wait_for_setup(url: str, process: subprocess.Popen | None, timeout: float) -> dict:
    """Poll health until READY or SETUP_FAILED (returned), or raise if the server dies or ``timeout`` passes.

    ``process``: anything with ``poll()`` and ``returncode`` (a coglet process, a container), or None.
    """
    deadline = time.monotonic() + timeout
    state = {"status": "not polled"}  # a timeout <= 0 polls nothing
    while time.monotonic() < deadline:
        state = health(url)
        if state.get("status") in ("READY", "SETUP_FAILED"):
            return state
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"coglet exited with status {process.returncode} before setup finished.")
        time.sleep(0.25)
    raise TimeoutError(f"coglet at {url} did not finish setup within {timeout:.0f} s (last health: {state}).")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (where a receiver on 127.0.0.1 can be reached)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")
