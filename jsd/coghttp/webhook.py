"""The receiver of coglet's webhook calls: an HTTP server on 127.0.0.1 that queues each prediction's events."""

from __future__ import annotations

import http.server
import json
import queue
import threading


class WebhookReceiver:
    """Listens on 127.0.0.1 (a free port); :meth:`url` is what a prediction names as its ``webhook``."""

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

            def log_message(self, *args) -> None:  # the caller shows what matters; no access log on stderr
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, prediction_id: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhook/{prediction_id}"

    def expect(self, prediction_id: str) -> queue.Queue:
        """The queue the events of ``prediction_id`` arrive in (call before starting the prediction)."""
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
