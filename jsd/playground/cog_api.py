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
import time
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
            text = "; ".join(f"`{d.get('loc', ['?'])[-1]}`: {d.get('msg')}" for d in detail)
            return cog_local.shorten_echoes(text)  # a 2,000-character prompt is quoted whole before the reason
        return cog_local.error_text(self.http_status, self.body)

    def input_names(self) -> list[str]:
        """The inputs a 422 names (``detail[].loc``), for the page to say which field is wrong."""
        detail = self.body.get("detail")
        if not isinstance(detail, list):
            return []
        return [str(d.get("loc", ["?"])[-1]) for d in detail if isinstance(d, dict)]


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


class ServerGone(PlaygroundError):
    """The server stopped answering, or lost the prediction (restarted), while the page waited for it."""


class ServerStarting(PlaygroundError):
    """The server answers 503: it is up but its ``setup()`` has not finished (weights still loading)."""


CANCELED = Outcome(200, {"status": "canceled"})  # a request canceled before the server took it


@dataclass
class CogAPI:
    """A Cog server at ``url``. ``webhook``: a receiver the server can reach (async predictions), or None (sync)."""

    url: str
    webhook: WebhookReceiver | None = None
    timeout: float = 600.0  # seconds one prediction may take before the playground gives up on it
    # coglet posts the "start" event as soon as the prediction starts; none within this many seconds means the
    # server cannot reach the receiver (a container on a bridge network, a remote host behind an SSH tunnel).
    webhook_probe: float = 20.0
    # While no event comes, the server's health is asked this often: a server that died or restarted mid-run
    # is seen within a few seconds instead of after ``timeout`` (the page said "3/30" for minutes).
    heartbeat: float = 2.0
    # This many health checks in a row saying READY (idle) while our prediction has not completed: the server
    # restarted and forgot it (coglet keeps no prediction across a restart).
    lost_after: int = 3
    _running: dict[str, str] = field(default_factory=dict)  # session → prediction id, for Cancel
    _cancels: dict[str, threading.Event] = field(default_factory=dict)  # session → its Cancel button was pressed
    _closing: threading.Event = field(default_factory=threading.Event)  # the playground is stopping

    def schema(self) -> dict:
        """``GET /openapi.json``; :class:`ServerStarting` on 503, :class:`PlaygroundError` when it is not Cog."""
        try:
            with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=30) as response:
                document = json.load(response)
        except urllib.error.HTTPError as err:
            if err.code == 503:
                raise ServerStarting(f"{self.url} is starting (HTTP 503)") from None
            raise PlaygroundError(f"{self.url}/openapi.json answered HTTP {err.code}: is this a Cog server?") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise PlaygroundError(f"no server answers at {self.url} ({reason})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PlaygroundError(f"{self.url}/openapi.json is not JSON: is this a Cog server?") from None
        return document

    def schema_when_ready(self, timeout: float, log: Callable[[str], None], poll: float = 1.0) -> dict:
        """:meth:`schema`, waiting up to ``timeout`` s for a server that is still starting (503: loading weights).

        ``docker compose up`` starts the server and the playground at once; a starting server is a Cog server.
        """
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                return self.schema()
            except ServerStarting:
                status = self.health().get("status", "?")
                if status == "SETUP_FAILED":
                    raise PlaygroundError(f"{self.url} failed its setup (SETUP_FAILED): see the server's log") from None
                if time.monotonic() >= deadline:
                    raise PlaygroundError(f"{self.url} was still starting ({status}) after {timeout:.0f} s") from None
                if not said:
                    log(f"{self.url} is starting ({status}); waiting for it to be READY (up to {timeout:.0f} s)")
                    said = True
                time.sleep(poll)

    def health(self) -> dict:
        """``GET /health-check`` (``{"status": "UNREACHABLE"}`` when nothing answers)."""
        return cog_local.health(self.url)

    def predict(
        self,
        inputs: dict,
        *,
        session: str = "",
        on_event: Callable[[dict], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Outcome:
        """Run one prediction; ``on_event`` sees every webhook body (async mode) as it arrives, ``on_wait`` is
        called while another prediction holds the server (409) and this one waits its turn."""
        canceled = self._cancels[session] = threading.Event()
        on_wait = on_wait or (lambda: None)
        try:
            if self.webhook is not None:
                self._running[session] = prediction_id = _new_id()
                outcome = self._predict_async(
                    self.webhook, prediction_id, inputs, on_event or (lambda body: None), on_wait, canceled
                )
                if outcome is not None:
                    return outcome
                self.webhook = None  # the server cannot reach it: synchronous from now on
            self._running[session] = prediction_id = _new_id()
            status, body = self.submit_when_free(
                {"id": prediction_id, "input": inputs}, canceled, on_wait, timeout=self.timeout
            )
            return Outcome(status, body)
        finally:
            self._running.pop(session, None)
            self._cancels.pop(session, None)

    def submit_when_free(
        self,
        body: dict,
        canceled: threading.Event,
        on_wait: Callable[[], None],
        *,
        timeout: float | None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict]:
        """``POST /predictions``, sent again while the server answers 409 (another prediction holds its one slot)
        for up to :attr:`timeout` s; a Cancel while waiting returns :data:`CANCELED` and nothing runs."""
        deadline = time.monotonic() + self.timeout
        backoff = 0.05
        while True:
            status, answer = cog_local.post_json_with_retry(
                self.url, "/predictions", body, timeout, retry_for=0, headers=headers
            )
            if status != 409 or time.monotonic() >= deadline:
                return status, answer
            on_wait()
            if canceled.wait(backoff) or self._closing.is_set():
                return CANCELED.http_status, dict(CANCELED.body)
            backoff = min(backoff * 2, 1.0)

    def _predict_async(
        self,
        webhook: WebhookReceiver,
        prediction_id: str,
        inputs: dict,
        on_event: Callable[[dict], None],
        on_wait: Callable[[], None],
        canceled: threading.Event,
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
            status, answer = self.submit_when_free(
                body, canceled, on_wait, timeout=30, headers={"Prefer": "respond-async"}
            )
            if status != 202:  # 422, canceled while waiting, a 409 that outlived the wait, ...: nothing runs
                return Outcome(status, answer)
            if canceled.is_set():  # pressed between the 202 and here
                self._post_cancel(prediction_id)
            first = True
            while True:
                event = self.next_event(events, started=not first)
                if event is None:
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

    def next_event(self, events: queue.Queue, *, started: bool) -> dict | None:
        """The next webhook body; None after :attr:`webhook_probe` s (first event) or :attr:`timeout` s.

        Between events the server's health is checked every :attr:`heartbeat` s: :class:`ServerGone` when it
        no longer answers, or when it stays idle (READY) although our prediction has not completed.
        """
        deadline = time.monotonic() + (self.timeout if started else self.webhook_probe)
        idle = 0
        while True:
            try:
                return events.get(timeout=max(0.0, min(self.heartbeat, deadline - time.monotonic())))
            except queue.Empty:
                pass
            if time.monotonic() >= deadline:
                return None
            if self._closing.is_set():
                raise PlaygroundError("the playground is stopping")
            status = self.health().get("status")
            if status == "UNREACHABLE":
                raise ServerGone(f"{self.url} stopped answering during the prediction")
            idle = idle + 1 if started and status == "READY" else 0
            if idle >= self.lost_after:
                raise ServerGone(f"{self.url} is idle but never completed the prediction (it restarted)")

    def cancel(self, session: str = "") -> bool:
        """Cancel this session's prediction: one waiting for the server's slot is never sent, a running one gets
        ``POST /predictions/{id}/cancel``. False when this session has none."""
        canceled = self._cancels.get(session)
        if canceled is not None:
            canceled.set()
        prediction_id = self._running.get(session)
        return (prediction_id is not None and self._post_cancel(prediction_id)) or canceled is not None

    def close(self) -> None:
        """The playground stops: every prediction still running is canceled on the server, every wait ends."""
        self._closing.set()
        for canceled in list(self._cancels.values()):
            canceled.set()
        for prediction_id in list(self._running.values()):
            self._post_cancel(prediction_id)

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
