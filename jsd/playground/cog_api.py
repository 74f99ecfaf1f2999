"""The playground's side of Cog's HTTP API: schema, health, predictions (async with a webhook, or sync), cancel.

Cog's protocol, as coglet 0.23 serves it (docs/serving.md, design.md):

- ``POST /predictions`` with ``Prefer: respond-async``, a client-chosen ``id``, a ``webhook`` URL and
  ``webhook_events_filter`` answers 202 at once; coglet then POSTs the whole prediction object to the
  webhook on ``start``, on new ``logs`` (diffusers' progress bar, ``3/10 [...]``, is in them) and on
  ``completed``. ``GET /predictions/{id}`` is 405: the webhook is the only way to learn the result.
- ``POST /predictions/{id}/cancel`` stops it between two denoising steps (status ``canceled``).
- 409: another prediction holds the slot (retried by ``cog_local.post_json_with_retry``); 422:
  ``detail[].loc/msg``; an exception in ``run()``: 200 with ``status: failed`` and coglet's wrapped
  ``error`` (``cog_local.clean_error``).

A server that cannot reach the webhook (a remote deployment: the receiver listens on 127.0.0.1 only)
gets a synchronous request instead, and the page shows progress without steps.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import queue
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]
# tqdm's bar as diffusers prints it into the logs: " 30%|███       | 3/10 [00:01<00:02, ...]"
_STEP = re.compile(r"(\d+)/(\d+) \[")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _load_cog_local() -> ModuleType:
    """``scripts/cog_local.py`` (not a package: loaded by path, as the tests do) for its retry and error helpers."""
    path = REPO / "scripts" / "cog_local.py"
    spec = importlib.util.spec_from_file_location("cog_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cog_local = _load_cog_local()


class PlaygroundError(Exception):
    """A problem with the server or the playground's own input: shown as one line, never a traceback."""


@dataclass
class Outcome:
    """The end of one prediction: its final JSON (``status``, ``output``, ``metrics``, ``error``) and HTTP status."""

    http_status: int
    body: dict

    @property
    def succeeded(self) -> bool:
        return self.http_status == 200 and self.body.get("status") == "succeeded"

    @property
    def canceled(self) -> bool:
        return self.body.get("status") == "canceled"

    def error_text(self) -> str:
        """One line naming the input: a 422's ``detail`` as ```name`: msg``, else the cleaned ``error``."""
        detail = self.body.get("detail")
        if self.http_status == 422 and isinstance(detail, list):
            return "; ".join(f"`{d.get('loc', ['?'])[-1]}`: {d.get('msg')}" for d in detail)
        return cog_local.error_text(self.http_status, self.body)


def step_of(logs: str) -> tuple[int, int] | None:
    """The last ``(step, total)`` of the progress bar in a prediction's logs, or None before the first step."""
    matches = _STEP.findall(logs or "")
    return (int(matches[-1][0]), int(matches[-1][1])) if matches else None


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 (a free port) that hands coglet's webhook calls to the waiting prediction."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except json.JSONDecodeError:
                    body = None
                self.send_response(200 if isinstance(body, dict) else 400)
                self.end_headers()
                if isinstance(body, dict):
                    receiver._deliver(self.path.rsplit("/", 1)[-1], body)

            def log_message(self, *args) -> None:  # the page shows what matters; no access log on stderr
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, prediction_id: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhook/{prediction_id}"

    def expect(self, prediction_id: str) -> queue.Queue:
        with self._lock:
            return self._queues.setdefault(prediction_id, queue.Queue())

    def forget(self, prediction_id: str) -> None:
        with self._lock:
            self._queues.pop(prediction_id, None)

    def _deliver(self, prediction_id: str, body: dict) -> None:
        with self._lock:
            target = self._queues.get(prediction_id)
        if target is not None:
            target.put(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class CogAPI:
    """A Cog server at ``url``. ``webhook``: a receiver the server can reach (async predictions), or None (sync)."""

    url: str
    webhook: WebhookReceiver | None = None
    timeout: float = 600.0  # seconds one prediction may take before the playground gives up on it
    # coglet posts the "start" event as soon as the prediction starts; none within this many seconds means the
    # server cannot reach the receiver (a container on a bridge network, a remote host behind an SSH tunnel).
    webhook_probe: float = 20.0
    _running: dict[str, str] = field(default_factory=dict)  # session → prediction id, for Cancel

    def schema(self) -> dict:
        """``GET /openapi.json``; :class:`PlaygroundError` when the URL is not a Cog server."""
        try:
            with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=30) as response:
                document = json.load(response)
        except urllib.error.HTTPError as err:
            raise PlaygroundError(f"{self.url}/openapi.json answered HTTP {err.code}: is this a Cog server?") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise PlaygroundError(f"no server answers at {self.url} ({reason})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PlaygroundError(f"{self.url}/openapi.json is not JSON: is this a Cog server?") from None
        return document

    def health(self) -> dict:
        """``GET /health-check`` (``{"status": "UNREACHABLE"}`` when nothing answers)."""
        return cog_local.health(self.url)

    def predict(self, inputs: dict, *, session: str = "", on_event: Callable[[dict], None] | None = None) -> Outcome:
        """Run one prediction; ``on_event`` sees every webhook body (async mode) as it arrives."""
        try:
            if self.webhook is not None:
                self._running[session] = prediction_id = _new_id()
                outcome = self._predict_async(self.webhook, prediction_id, inputs, on_event or (lambda body: None))
                if outcome is not None:
                    return outcome
                self.webhook = None  # the server cannot reach it: synchronous from now on
            self._running[session] = prediction_id = _new_id()
            status, body = cog_local.post_json_with_retry(
                self.url, "/predictions", {"id": prediction_id, "input": inputs}, self.timeout, retry_for=30
            )
            return Outcome(status, body)
        finally:
            self._running.pop(session, None)

    def _predict_async(
        self, webhook: WebhookReceiver, prediction_id: str, inputs: dict, on_event: Callable[[dict], None]
    ) -> Outcome | None:
        """The prediction through the webhook; None (and the prediction canceled) when no webhook call comes."""
        events = webhook.expect(prediction_id)
        try:
            body = {
                "id": prediction_id,
                "input": inputs,
                "webhook": webhook.url(prediction_id),
                "webhook_events_filter": WEBHOOK_EVENTS,
            }
            status, answer = cog_local.post_json_with_retry(
                self.url, "/predictions", body, 30, headers={"Prefer": "respond-async"}
            )
            if status != 202:  # 422, a 409 that outlived the retries, ...: nothing runs
                return Outcome(status, answer)
            first = True
            while True:
                try:
                    event = events.get(timeout=self.webhook_probe if first else self.timeout)
                except queue.Empty:
                    if first:  # its result could never arrive: stop it, free the slot
                        self._post_cancel(prediction_id)
                        return None
                    raise PlaygroundError(f"no answer from {self.url} within {self.timeout:.0f} s") from None
                first = False
                on_event(event)
                if event.get("status") in ("succeeded", "failed", "canceled"):
                    return Outcome(200, event)
        finally:
            webhook.forget(prediction_id)

    def cancel(self, session: str = "") -> bool:
        """Cancel this session's running prediction (``POST /predictions/{id}/cancel``); False when none runs."""
        prediction_id = self._running.get(session)
        return prediction_id is not None and self._post_cancel(prediction_id)

    def _post_cancel(self, prediction_id: str) -> bool:
        request = urllib.request.Request(
            f"{self.url}/predictions/{urllib.parse.quote(prediction_id)}/cancel", data=b"", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def _new_id() -> str:
    return f"playground-{uuid.uuid4().hex[:16]}"


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (where the webhook receiver on 127.0.0.1 can be reached)."""
    return (urllib.parse.urlsplit(url).hostname or "") in LOOPBACK_HOSTS or (
        urllib.parse.urlsplit(url).hostname or ""
    ).startswith("127.")
