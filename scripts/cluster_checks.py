"""Check deploy/ (Compose + HAProxy) with CPU replicas of the jsd image: what `make cluster-test` runs.

    .venv/bin/python scripts/cluster_checks.py --image jsd:cpu --proxy-image jsd-cluster-test/haproxy:bookworm

Starts deploy/compose.yaml with docker-compose (project ``jsd-cluster-test``): the proxy and replicas 1-3 of
``--image``, plus replica 4 with 16 bytes of its UNet altered (SETUP_FAILED), all on the host network with free
ports on 127.0.0.1. Then, through the proxy: a request before any replica is READY (503 with a reason), 24
predictions from 8 concurrent clients (no 409, every replica serves some, read from each replica's own log;
latencies printed), an async prediction with a webhook (PUT /predictions/{id}), a cancel, the playground's
client (POST with a body id, webhook, cancel), a replica killed mid-prediction (the take-out time printed)
and restarted, and replica 4 never reached. One PASS/FAIL line per check; exit status 1 when any fails. The
containers are removed at the end whatever happens.

The HTTP side is :mod:`jsd.coghttp` (``retry_for=0``: no 409 retry, since a 409 reaching a client is the failure
this checks), plus ``PUT /predictions/{id}``, which it does not send.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from container_checks import ALTERED_FILE, FAST, LONG, Docker, Report  # this file's folder: sys.path[0]

from jsd.coghttp import client
from jsd.coghttp.errors import error_text
from jsd.coghttp.webhook import WebhookReceiver

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
PROJECT = "jsd-cluster-test"
REPLICAS = ("replica1", "replica2", "replica3")
ALTERED = "replica4"
SERVED = "Seeds "  # predict.py logs one "Seeds [...]; returned N image(s)" line per prediction it ran
TAKE_OUT_LIMIT = 5.0  # seconds: the proxy takes a killed replica out within this (observe layer4, else 2 checks)


def put_json(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    """``PUT`` with a JSON body (jsd.coghttp sends only POST): (status, JSON answer)."""
    headers = {"Content-Type": "application/json"} | headers
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_final(hooks: WebhookReceiver, prediction_id: str, timeout: float) -> dict:
    """The prediction's last webhook body (succeeded, failed or canceled)."""
    events = hooks.expect(prediction_id)
    deadline = time.monotonic() + timeout
    while True:
        body = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if body.get("status") in client.FINAL_STATUSES:
            return body


class Cluster:
    """deploy/compose.yaml run by docker-compose with free ports; its replicas, logs and HAProxy's stats."""

    def __init__(self, docker: Docker, compose: str, image: str, proxy_image: str):
        self.docker = docker
        self.ports = {f"REPLICA_PORT_{n}": client.free_port() for n in range(1, 5)}
        self.proxy_port, self.stats_port = client.free_port(), client.free_port()
        self.env = {
            **os.environ,
            **{key: str(value) for key, value in self.ports.items()},
            "JSD_IMAGE": image,
            "JSD_PROXY_IMAGE": proxy_image,
            "PROXY_ADDRESS": "127.0.0.1",
            "PROXY_PORT": str(self.proxy_port),
            "STATS_PORT": str(self.stats_port),
            "DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
            # vfs copies the whole image (1.7 GB) per container: creating one took over 60 s, Compose's default.
            "COMPOSE_HTTP_TIMEOUT": os.environ.get("COMPOSE_HTTP_TIMEOUT", "900"),
        }
        self.compose_command = [compose, "--project-name", PROJECT, "--file", str(COMPOSE_FILE)]
        self.url = f"http://127.0.0.1:{self.proxy_port}"

    def compose(self, *args: str, timeout: float = 900) -> str:
        result = subprocess.run(
            [*self.compose_command, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed: {result.stderr[-800:]}")
        return result.stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def replica_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports['REPLICA_PORT_' + service[-1]]}"

    def health(self, service: str) -> str:
        return client.health(self.replica_url(service)).get("status", "UNREACHABLE")

    def served(self, service: str) -> int:
        """Predictions the replica ran, from its own log."""
        result = self.docker("logs", self.container(service), check=False)
        return (result.stdout + result.stderr).decode(errors="replace").count(SERVED)

    def stats(self) -> dict[str, dict]:
        """HAProxy's CSV stats of the replicas backend, by server name (r1..r4)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=5) as response:
            text = response.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def proxy_state(self, server: str) -> str:
        return self.stats()[server]["status"]

    def wait(self, what: str, predicate, timeout: float, every: float = 0.2) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if predicate():
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(every)
        raise TimeoutError(f"{what}: not within {timeout:.0f} s")


RETRYABLE = "still running"  # the proxy's 503 (Retry-After: 1) for a replica's 409 (haproxy.cfg)
RETRIED: list[int] = []  # seeds whose prediction got that 503 once or more


def predict(url: str, seed: int, inputs: dict = FAST) -> tuple[int, dict, float]:
    """``POST /predictions`` through the proxy; its retryable 503 is sent again after 1 s, as Retry-After says."""
    started = time.monotonic()
    for _ in range(3):
        inputs = {"prompt": "猫 油絵", "seed": seed, **inputs}
        status, body = client.post_prediction(url, inputs, timeout=300, retry_for=0)
        if not (status == 503 and RETRYABLE in body.get("error", "")):
            break
        RETRIED.append(seed)
        time.sleep(1)
    return status, body, time.monotonic() - started


def ok(status: int, body: dict) -> bool:
    return status == 200 and body.get("status") == "succeeded"


# ---- the checks ----------------------------------------------------------------------------------------------


def check_no_replica_ready(cluster: Cluster) -> str:
    # HAProxy counts a server UP until its checks fail ("fall 2": 2 s): before that, a request finds refused
    # connections and gets the generic 503 instead (retried on each server, so still at once).
    cluster.wait(
        "the proxy counts r1-r4 DOWN",
        lambda: all(s["status"] == "DOWN" for s in cluster.stats().values() if s["svname"] != "BACKEND"),
        120,
    )
    started = time.monotonic()
    status, body, _ = predict(cluster.url, 1)
    seconds = time.monotonic() - started
    assert status == 503 and "no jsd replica is ready" in body.get("error", ""), f"HTTP {status}: {body}"
    assert seconds < 5, f"the 503 took {seconds:.1f} s"
    return f"503 in {seconds * 1000:.0f} ms: {body['error'][:70]}..."


def check_ready(cluster: Cluster, timeout: float) -> str:
    waited = cluster.wait("replicas 1-3 READY", lambda: all(cluster.health(s) == "READY" for s in REPLICAS), timeout, 1)
    cluster.wait(f"{ALTERED} SETUP_FAILED", lambda: cluster.health(ALTERED) == "SETUP_FAILED", timeout, 1)
    cluster.wait("the proxy counts r1-r3 UP", lambda: all(cluster.proxy_state(f"r{n}") == "UP" for n in (1, 2, 3)), 30)
    state = cluster.proxy_state("r4")
    assert state.startswith("DOWN"), f"the proxy counts the SETUP_FAILED replica {state}"
    return f"replicas 1-3 READY after {waited:.0f} s, {ALTERED} SETUP_FAILED; proxy: r1-r3 UP, r4 {state}"


def check_load(cluster: Cluster, clients: int = 8, total: int = 24) -> str:
    before = {service: cluster.served(service) for service in REPLICAS}
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda seed: predict(cluster.url, seed), range(100, 100 + total)))
    statuses = [status for status, _, _ in results]
    assert 409 not in statuses, f"{statuses.count(409)} of {total} clients saw a 409"
    failed = [(status, error_text(status, body)) for status, body, _ in results if not ok(status, body)]
    assert not failed, f"{len(failed)} of {total} failed: {failed[:3]}"
    served = {service: cluster.served(service) - before[service] for service in REPLICAS}
    assert sum(served.values()) == total, f"the replicas' logs count {served}, not {total} in all"
    assert all(served.values()), f"a replica served none: {served}"
    retried = [seed for seed in RETRIED if 100 <= seed < 100 + total]
    latencies = sorted(seconds for _, _, seconds in results)
    quantiles = statistics.quantiles(latencies, n=10)
    return (
        f"{total} from {clients} clients, all succeeded, no 409 ({len(retried)} sent again after the proxy's "
        f"retryable 503); per replica (own log) {served}; latency s: "
        f"min {latencies[0]:.2f}, p50 {statistics.median(latencies):.2f}, p90 {quantiles[8]:.2f}, "
        f"max {latencies[-1]:.2f}, mean {statistics.mean(latencies):.2f}"
    )


def put_async(cluster: Cluster, hooks: WebhookReceiver, inputs: dict) -> str:
    """``PUT /predictions/{id}`` with ``Prefer: respond-async`` and a webhook for "completed": the new id."""
    prediction_id = f"cluster-{uuid.uuid4().hex[:12]}"
    hooks.expect(prediction_id)
    body = {"input": inputs, "webhook": hooks.url(prediction_id), "webhook_events_filter": ["completed"]}
    status, answer = put_json(f"{cluster.url}/predictions/{prediction_id}", body, {"Prefer": "respond-async"})
    assert status == 202, f"PUT /predictions/{prediction_id}: HTTP {status} {answer}"
    return prediction_id


def check_async_webhook(cluster: Cluster, hooks: WebhookReceiver) -> str:
    started = time.monotonic()
    prediction_id = put_async(cluster, hooks, {"prompt": "犬", "seed": 7, **FAST})
    final = wait_final(hooks, prediction_id, 300)
    assert final["status"] == "succeeded", f"webhook: {final.get('status')} {final.get('error')}"
    seconds = time.monotonic() - started
    return f"202, then the completed webhook: succeeded, {len(final['output'])} image(s) in {seconds:.1f} s"


def check_cancel(cluster: Cluster, hooks: WebhookReceiver) -> str:
    prediction_id = put_async(cluster, hooks, {"prompt": "長い", "seed": 8, **LONG})
    running = cluster.wait("a replica BUSY", lambda: any(cluster.health(s) == "BUSY" for s in REPLICAS), 30, 0.1)
    busy = [s for s in REPLICAS if cluster.health(s) == "BUSY"]
    assert client.cancel(cluster.url, prediction_id), "cancel through the proxy: not 200 (404: the wrong replica)"
    final = wait_final(hooks, prediction_id, 120)
    assert final["status"] == "canceled", f"webhook after the cancel: {final.get('status')}"
    return f"cancel 200 (the prediction ran on {busy}, busy after {running:.1f} s), webhook: canceled"


def check_playground_client(cluster: Cluster) -> str:
    from jsd.playground.cog_api import CogAPI

    receiver = WebhookReceiver()
    try:
        api = CogAPI(cluster.url, webhook=receiver)
        fields = len(api.schema()["components"]["schemas"]["Input"]["properties"])
        outcome = api.predict({"prompt": "花", "seed": 9, **FAST}, session="a")
        assert outcome.succeeded, outcome.error_text()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(o=api.predict({"prompt": "山", **LONG}, session="b")))
        worker.start()
        cluster.wait("the playground's long prediction runs", lambda: "b" in api._running, 30, 0.05)
        cluster.wait("a replica BUSY", lambda: any(cluster.health(s) == "BUSY" for s in REPLICAS), 30, 0.1)
        assert api.cancel("b"), "the playground's cancel did not reach the replica"
        worker.join(120)
        assert result["o"].canceled, f"after the cancel: {result['o'].body.get('status')}"
    finally:
        receiver.close()
    return f"schema ({fields} inputs), an async prediction with its webhook: succeeded; cancel (POST body id): canceled"


def check_playground_page(cluster: Cluster, python: str) -> str:
    port = client.free_port()
    command = [python, "-m", "jsd", "playground", "--api", cluster.url, "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = f"http://127.0.0.1:{port}/"
        served = lambda: urllib.request.urlopen(page, timeout=5).status == 200  # noqa: E731
        waited = cluster.wait("the playground page", served, 180, 1)
        assert process.poll() is None, "the playground exited"
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert "Playground on" in output, output[-500:]
    return f"`python -m jsd playground --api {cluster.url}` served its page after {waited:.0f} s"


def check_kill(cluster: Cluster, timeout: float) -> str:
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=predict(cluster.url, 11, LONG)))
    worker.start()
    cluster.wait("a replica BUSY", lambda: any(cluster.health(s) == "BUSY" for s in REPLICAS), 60, 0.1)
    victim = next(s for s in REPLICAS if cluster.health(s) == "BUSY")
    server = f"r{victim[-1]}"
    killed = time.monotonic()
    cluster.docker("kill", cluster.container(victim))
    take_out = cluster.wait("the proxy takes it out", lambda: cluster.proxy_state(server).startswith("DOWN"), 30, 0.05)
    worker.join(60)
    answered = time.monotonic() - killed
    status, body, _ = result["r"]
    assert status == 502 and "stopped answering" in body.get("error", ""), f"the killed request: HTTP {status} {body}"
    with ThreadPoolExecutor(4) as pool:
        later = list(pool.map(lambda seed: predict(cluster.url, seed), range(200, 206)))
    assert all(ok(s, b) for s, b, _ in later), f"after the kill: {[(s, b.get('error')) for s, b, _ in later]}"
    cluster.docker("start", cluster.container(victim))
    back = cluster.wait("the proxy takes it back", lambda: cluster.proxy_state(server) == "UP", timeout, 0.5)
    before = cluster.served(victim)
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda seed: predict(cluster.url, seed), range(300, 306)))
    assert all(ok(s, b) for s, b, _ in again), f"after the restart: {[(s, b.get('error')) for s, b, _ in again]}"
    assert cluster.served(victim) > before, f"{victim} served nothing after its restart"
    assert take_out <= TAKE_OUT_LIMIT, f"taken out after {take_out:.1f} s (limit {TAKE_OUT_LIMIT:.0f} s)"
    return (
        f"killed {victim} mid-prediction: that client got 502 ({body['error'][:40]}...) "
        f"{answered:.1f} s after the kill; proxy took it out in {take_out:.2f} s; 6 later predictions succeeded; "
        f"restarted, UP again after {back:.0f} s (setup included) and serving"
    )


def check_altered_never_reached(cluster: Cluster) -> str:
    stot = int(cluster.stats()["r4"]["stot"])
    served = cluster.served(ALTERED)
    assert stot == 0 and served == 0, f"{ALTERED} got {stot} request(s) from the proxy, ran {served}"
    return f"{ALTERED} ({cluster.health(ALTERED)}): 0 requests from the proxy (stats), none in its log"


def altered_weights(cluster: Cluster, workdir: Path) -> None:
    """Create replica 4 and alter 16 bytes of its UNet (as container_checks' altered-weights check does)."""
    cluster.compose("up", "--no-start", ALTERED)
    container = cluster.container(ALTERED)
    original = workdir / "unet.safetensors"
    cluster.docker("cp", f"{container}:/src/{ALTERED_FILE}", str(original))
    data = bytearray(original.read_bytes())
    data[-16:] = bytes(byte ^ 0xFF for byte in data[-16:])
    original.write_bytes(data)
    cluster.docker("cp", str(original), f"{container}:/src/{ALTERED_FILE}")


def run(args: argparse.Namespace, workdir: Path) -> Report:
    docker = Docker(args.docker)
    cluster = Cluster(docker, args.compose, args.image, args.proxy_image)
    report = Report()
    hooks = WebhookReceiver()
    print(f"proxy {cluster.url}, stats http://127.0.0.1:{cluster.stats_port}/, replicas {cluster.ports}", flush=True)
    try:
        started = time.monotonic()
        cluster.compose("up", "--detach", "proxy")
        report.check("no replica running → 503 with a reason", lambda: check_no_replica_ready(cluster))
        altered_weights(cluster, workdir)
        cluster.compose("up", "--detach", *REPLICAS, ALTERED)
        print(f"containers up in {time.monotonic() - started:.0f} s", flush=True)
        if not report.check("replicas READY, SETUP_FAILED one DOWN", lambda: check_ready(cluster, args.setup_timeout)):
            print(cluster.compose("logs", "--tail", "30")[-4000:], flush=True)
            return report
        report.check("24 predictions, 8 clients", lambda: check_load(cluster))
        report.check("async + webhook (PUT)", lambda: check_async_webhook(cluster, hooks))
        report.check("cancel through the proxy", lambda: check_cancel(cluster, hooks))
        report.check("playground client (async, cancel)", lambda: check_playground_client(cluster))
        report.check("playground page --api proxy", lambda: check_playground_page(cluster, args.python))
        report.check("replica killed mid-prediction", lambda: check_kill(cluster, args.setup_timeout))
        report.check("SETUP_FAILED replica never reached", lambda: check_altered_never_reached(cluster))
    finally:
        hooks.close()
        try:
            cluster.compose("down", "--timeout", "5")
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"warning: docker-compose down: {err}; remove the {PROJECT}_* containers yourself", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="jsd:cpu", help="the replicas' image (default: %(default)s)")
    parser.add_argument("--proxy-image", default="jsd-cluster-test/haproxy:bookworm", help="an image with haproxy")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker CLI to use")
    parser.add_argument("--compose", default="docker-compose", help="Compose CLI (docker-compose 1.29 or v2)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the playground")
    parser.add_argument("--setup-timeout", type=float, default=600, help="seconds for the replicas' setup()")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jsd-cluster-") as tmp:
        try:
            report = run(args, Path(tmp))
        except Exception as err:  # e.g. compose cannot start: the checks cannot go on
            print(f"FAIL  cluster checks: stopped early, {err}", flush=True)
            return 1
    elapsed = time.monotonic() - started
    if report.failures:
        print(f"{len(report.failures)} cluster check(s) failed in {elapsed:.0f} s: {', '.join(report.failures)}")
        return 1
    print(f"All cluster checks passed in {elapsed:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
