"""A fake Cog server on 127.0.0.1 for tests: each request is answered by a function the test gives.

def answer(request: Request) -> tuple[int, dict | bytes]:
    return (202, {"status": "starting"}) if request.headers.get("Prefer") == "respond-async" else (200, {})

with FakeCogServer(answer) as fake:
    client.post_prediction(fake.url, {"prompt": "猫"})
    assert fake.requests[0].path == "/predictions"
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Request:
    """One request the fake received: method, path, headers and the JSON body (None when it has none)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


Answer = Callable[[Request], tuple[int, "dict | bytes"]]


class FakeCogServer:
    """Serves ``answer(request)`` (a dict is sent as JSON, bytes as they are); ``requests`` lists what came."""

    def __init__(self, answer: Answer) -> None:
        self.requests: list[Request] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw.strip() else None
                except json.JSONDecodeError:
                    body = None
                request = Request(self.command, self.path, dict(self.headers), body)
                fake.requests.append(request)
                status, reply = answer(request)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                if not isinstance(reply, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeCogServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scripted(statuses: list[int]) -> Answer:
    """Each POST answered with the next of ``statuses`` (the last repeats): 200 succeeds, 409 is coglet's "busy"."""
    left = list(statuses)

    def answer(request: Request) -> tuple[int, dict]:
        status = left.pop(0) if len(left) > 1 else left[0]
        if status == 200:
            return status, {"status": "succeeded", "output": "ok"}
        if status == 409:
            return status, {"error": "At capacity - all prediction slots busy", "status": "failed"}
        return status, {"error": f"status {status}"}

    return answer
