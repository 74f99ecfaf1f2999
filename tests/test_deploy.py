"""deploy/ holds together: each Compose replica has its GPU, its port and a server line in both HAProxy backends,
and HAProxy 2.6 accepts the configuration (when haproxy is installed; `make cluster-test` runs it for real)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CONFIG = (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8")


def backend(name: str) -> str:
    return re.search(rf"^backend {name}\n(.*?)(?=^\S|\Z)", CONFIG, re.M | re.S).group(1)


def replicas() -> dict[str, dict]:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))["services"]
    return {name: service for name, service in services.items() if name.startswith("replica")}


def test_each_replica_has_a_port_a_gpu_and_a_server_in_both_backends():
    gpus = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text(encoding="utf-8"))["services"]
    assert len(replicas()) >= 2
    for name, service in replicas().items():
        n = int(name.removeprefix("replica"))
        assert service["environment"]["PORT"] == f"${{REPLICA_PORT_{n}:-{5000 + n}}}"
        assert service["network_mode"] == "host" and "127.0.0.1" in service["command"]
        devices = gpus[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "capabilities": ["gpu"], "device_ids": [str(n - 1)]}]
        server = f'server r{n} "127.0.0.1:${{REPLICA_PORT_{n}-{5000 + n}}}" id {n}'
        assert server in backend("replicas") and server in backend("control"), f"{name}: no `{server}`"
    assert set(gpus) == set(replicas())
    assert backend("replicas").count("\n    server ") == backend("control").count("\n    server ") == len(replicas())


def test_the_proxy_reads_status_and_queues_one_request_per_replica():
    replicas_backend = backend("replicas")
    assert "maxconn 1" in replicas_backend and "http-check send meth GET uri /health-check" in replicas_backend
    expect = re.search(r"http-check expect rstring '(.*)'", replicas_backend).group(1)
    for status, up in [("READY", True), ("BUSY", True), ("STARTING", False), ("SETUP_FAILED", False),
                       ("DEFUNCT", False), ("UNHEALTHY", False)]:  # fmt: skip
        body = f'{{"status":"{status}","setup":{{"logs":"\\"status\\":\\"READY\\""}},"version":{{}}}}'
        assert bool(re.search(expect, body)) is up, status


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (make cluster-test runs it)")
def test_haproxy_accepts_the_configuration():
    env = {**os.environ, "JSD_PROXY_DIR": str(DEPLOY)}
    done = subprocess.run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr
