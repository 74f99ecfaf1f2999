"""The playground's session over a Cog server: async predictions with a webhook (or sync), per-session cancel.

The protocol itself (requests, 409 retries, error text, the webhook receiver) is :mod:`jsd.coghttp`'s. A server
that cannot reach the webhook (a remote deployment: the receiver listens on 127.0.0.1 only) gets a synchronous
request instead, and the page shows progress without steps.
"""

from __future__ import annotations

import queue
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from jsd.coghttp import client
from jsd.coghttp.client import FINAL_STATUSES, is_loopback
from jsd.coghttp.errors import error_text
from jsd.coghttp.webhook import WebhookReceiver

__all__ = ["CogAPI", "Outcome", "PlaygroundError", "WebhookReceiver", "is_loopback", "step_of"]

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
            return client.fetch_schema(self.url)
        except client.CogServerError as err:
            raise PlaygroundError(str(err)) from None

    def health(self) -> dict:
        """``GET /health-check`` (``{"status": "UNREACHABLE"}`` when nothing answers)."""
        return client.health(self.url)

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
            status, body = client.post_prediction(
                self.url, inputs, prediction_id=prediction_id, timeout=self.timeout, retry_for=30
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
            status, answer = client.start_prediction(self.url, prediction_id, inputs, webhook.url(prediction_id))
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
                if event.get("status") in FINAL_STATUSES:
                    return Outcome(200, event)
        finally:
            webhook.forget(prediction_id)

    def cancel(self, session: str = "") -> bool:
        """Cancel this session's running prediction (``POST /predictions/{id}/cancel``); False when none runs."""
        prediction_id = self._running.get(session)
        return prediction_id is not None and self._post_cancel(prediction_id)

    def _post_cancel(self, prediction_id: str) -> bool:
        return client.cancel(self.url, prediction_id)


def _new_id() -> str:
    return f"playground-{uuid.uuid4().hex[:16]}"
