"""Minimal reproductions of two coglet (Cog 0.23) behaviours, for an upstream bug report.

    .venv/bin/python scripts/repro_coglet.py              # 1,000 sequential predictions (about 10 s)
    .venv/bin/python scripts/repro_coglet.py -n 200

Needs only ``pip install cog`` (which pulls coglet): no jsd, no torch. It writes a four-line runner
into a temporary folder, starts ``python -m cog.server.http`` on 127.0.0.1 and then:

1. sends N synchronous ``POST /predictions`` one after the other with plain ``urllib`` (each request
   starts only after the previous answer was read) and counts the answers by HTTP status. Expected:
   all 200. Observed: some 409 "At capacity - all prediction slots busy", because coglet answers a
   sync prediction before it frees its slot;
2. sends one prediction whose ``run()`` raises ``ValueError("bad value")`` and prints ``error``.
   Expected: "bad value". Observed: "Prediction failed: Prediction failed: ValueError: bad value".
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RUNNER = """from cog import BaseRunner


class Runner(BaseRunner):
    def run(self, text: str = "hi") -> str:
        if text == "fail":
            raise ValueError("bad value")
        return text
"""


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main() -> int:
    if importlib.util.find_spec("coglet") is None:  # started by a Python without the project's packages
        from _venv import exit_with_hint  # this file's folder is sys.path[0]

        exit_with_hint("coglet")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="sequential predictions (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="coglet-repro-") as tmp, socket.socket() as sock:
        Path(tmp, "predict.py").write_text(RUNNER)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        env = dict(os.environ, COG_PREDICT_TYPE_STUB="predict.py:Runner", PORT=str(port))
        # coglet starts its worker with the `python` on PATH: put this interpreter's first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        server = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/health-check", timeout=5) as response:
                        health = json.load(response)
                    if health["status"] == "READY":
                        break
                except (urllib.error.URLError, ConnectionError):
                    pass
                time.sleep(0.2)
            else:
                print("coglet did not become READY within 120 s", file=sys.stderr)
                return 1
            print(f"coglet {health.get('version', {}).get('coglet', '?')}, Python {sys.version.split()[0]}")

            counts: collections.Counter = collections.Counter()
            first_409 = None
            for _ in range(args.n):
                status, body = post(f"{url}/predictions", {"input": {"text": "x"}})
                counts[status] += 1
                if status == 409 and first_409 is None:
                    first_409 = body
            print(
                f"{args.n} sequential predictions: " + ", ".join(f"{n} × HTTP {s}" for s, n in sorted(counts.items()))
            )
            if first_409 is not None:
                print(f"first 409 body: {json.dumps(first_409)}")

            status, body = post(f"{url}/predictions", {"input": {"text": "fail"}})
            if status == 409:  # the same race; this request is about the error text
                time.sleep(0.5)
                status, body = post(f"{url}/predictions", {"input": {"text": "fail"}})
            print(f"run() raised ValueError('bad value'): HTTP {status}, status {body.get('status')!r}, ", end="")
            print(f"error {body.get('error')!r}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
