"""The playground's session over a Cog server: async predictions with a webhook (or sync), per-session cancel.

The protocol itself (requests, 409 retries, error text, the webhook receiver) is :mod:`jsd.coghttp`'s. A server
that cannot reach the webhook (a remote deployment: the receiver listens on 127.0.0.1 only) gets a synchronous
request instead, and the page shows progress without steps.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from jsd.coghttp import client
from jsd.coghttp.client import FINAL_STATUSES, is_loopback
from jsd.coghttp.errors import error_text
from jsd.coghttp.webhook import WebhookReceiver

__all__ = [
    "CogAPI",
    "Outcome",
    "PlaygroundError",
    "ServerGone",
    "ServerStarting",
    "WebhookReceiver",
    "is_loopback",
    "step_of",
]

# tqdm's bar as diffusers prints it into the logs: " 30%|███       | 3/10 [00:01<00:02, ...]"
_STEP = re.compile(r"(\d+)/(\d+) \[")


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
        """One line naming the input: a 422's ```name`: msg``, else the cleaned ``error``."""
        return error_text(self.http_status, self.body)


def step_of(logs: str) -> tuple[int, int] | None:
    """The last ``(step, total)`` of the progress bar in a prediction's logs, or None before the first step."""
    matches = _STEP.findall(logs or "")
    return (int(matches[-1][0]), int(matches[-1][1])) if matches else None


class ServerGone(PlaygroundError):
    """The server stopped answering, or lost the prediction (restarted), while the page waited for it."""


class ServerStarting(PlaygroundError):
    """The server answers 503: it is up but its ``setup()`` has not finished (weights still loading)."""


CANCELED = Outcome(200, {"status": "canceled"})  # a request canceled before the server took it


@dataclass
class CogAPI:
    """A Cog server at ``url``. ``webhook``: a receiver the server can reach (async predictions), or None (sync).

    Its protocol-level parts (waiting for a starting server, health between events, waiting for the slot with
    Cancel) are the methods :meth:`schema_when_ready`, :meth:`next_event` and :meth:`submit_when_free`.
    """

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
            return client.fetch_schema(self.url)
        except client.CogServerError as err:
            if "HTTP 503" in str(err):
                raise ServerStarting(f"{self.url} is starting (HTTP 503)") from None
            raise PlaygroundError(str(err)) from None

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
        return client.health(self.url)

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
        backoff = client.FIRST_BACKOFF
        while True:
            status, answer = client.post_json(self.url, "/predictions", body, timeout, retry_for=0, headers=headers)
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
                "webhook_events_filter": client.WEBHOOK_EVENTS,
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
                if event.get("status") in FINAL_STATUSES:
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
        return client.cancel(self.url, prediction_id)


def _new_id() -> str:
    return f"playground-{uuid.uuid4().hex[:16]}"
