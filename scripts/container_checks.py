"""Check a built image of this model in Docker: it serves, validates, predicts, fails safe and stops.

    .venv/bin/python scripts/container_checks.py --image jsd:cpu    # what `make container-test` runs after the build
    .venv/bin/python scripts/container_checks.py --image jsd:cpu --docker /usr/bin/docker --setup-timeout 600
    .venv/bin/python scripts/container_checks.py --image jsd:cuda --cuda    # `make container-test-cuda`: no GPU

Every check prints one ``PASS``/``FAIL`` line with its figures or its reason; the exit status is 1 when any
fails. Containers run with ``--network host`` (the server on 127.0.0.1 and a free ``$PORT``) or
``--network none`` (health read from inside with ``docker exec``), never on a bridge network, and are
removed at the end whatever happens. The image must hold a checkpoint with a manifest (the tiny one in
``make container-test``); the HTTP side is :mod:`jsd.coghttp`'s client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

try:
    from PIL import Image

    from jsd.coghttp import client, datauri, local
    from jsd.coghttp.errors import error_text
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

REPO = Path(__file__).resolve().parents[1]
STOP_LIMIT = 10.0  # seconds `docker stop` may take: Docker's own grace period before SIGKILL
ALTERED_FILE = "weights/unet/diffusion_pytorch_model.safetensors"  # altered in the altered-weights check
FAST = {"width": 128, "height": 128, "num_inference_steps": 2}
# The largest request the server accepts (pixel budget, step cap): still denoising when `docker stop` comes.
LONG = {"width": 768, "height": 768, "num_outputs": 4, "num_inference_steps": 100}
# /src must hold these, and no file or folder named as in FORBIDDEN (leaks from the build context).
REQUIRED = ["predict.py", "cog.yaml", "jsd/serving.py", "weights/manifest.json", ".cog/openapi_schema.json"]
FORBIDDEN = {"tests", ".git", "outputs", "scripts", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}
FORBIDDEN_SUFFIXES = (".pyc", ".log")


class Docker:
    """The docker CLI (the one that talks to the running daemon), for the few commands the checks need."""

    def __init__(self, command: str):
        self.command = command

    def __call__(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run([self.command, *args], capture_output=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed ({result.returncode}): {_text(result.stderr)}")
        return result

    def inspect(self, name: str, template: str) -> str:
        return _text(self("inspect", "--format", template, name).stdout).strip()


def _text(data: bytes | str) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class Container:
    """One container of the image under test; ``poll()``/``returncode`` let client.wait_for_setup watch it."""

    def __init__(
        self,
        docker: Docker,
        image: str,
        *,
        network: str,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = (),
    ):
        self.docker = docker
        self.name = f"jsd-check-{uuid.uuid4().hex[:8]}"
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        started = time.monotonic()
        # vfs copies the whole image for a container: under load that took over 120 s (seen in a CI run).
        docker("create", "--name", self.name, f"--network={network}", *env_args, image, *command, timeout=900)
        self.create_seconds = time.monotonic() - started
        self.started_at: float | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.docker("start", self.name)

    def poll(self) -> int | None:
        """The exit status once the container has stopped (None while it runs), like ``Popen.poll``."""
        if self.docker.inspect(self.name, "{{.State.Running}}") == "true":
            return None
        self.returncode = int(self.docker.inspect(self.name, "{{.State.ExitCode}}"))
        return self.returncode

    def exec_health(self) -> dict:
        """``GET /health-check`` from inside the container (its own network: none, or host)."""
        code = (
            "import json, os, urllib.request\n"
            "url = f\"http://127.0.0.1:{os.environ.get('PORT', '5000')}/health-check\"\n"
            "try:\n    print(urllib.request.urlopen(url, timeout=5).read().decode())\n"
            "except OSError:\n    print(json.dumps({'status': 'UNREACHABLE'}))\n"
        )
        result = self.docker("exec", self.name, "python", "-c", code, check=False)
        if result.returncode != 0:
            return {"status": "UNREACHABLE", "exec_error": _text(result.stderr)[-300:]}
        return json.loads(result.stdout)

    def logs(self, tail: int = 40) -> str:
        result = self.docker("logs", "--tail", str(tail), self.name, check=False)
        return _text(result.stdout) + _text(result.stderr)

    def remove(self) -> None:
        # vfs deletes a whole copy of the image: on a loaded machine that took over 120 s (seen in a CI run).
        try:
            self.docker("rm", "--force", self.name, check=False, timeout=900)
        except subprocess.TimeoutExpired:
            print(f"warning: `docker rm --force {self.name}` still runs after 900 s; remove it yourself", flush=True)


def wait_for_setup_inside(container: Container, timeout: float) -> dict:
    """client.wait_for_setup for a container without a network: health read with ``docker exec``."""
    deadline = time.monotonic() + timeout
    state = {"status": "not polled"}
    while time.monotonic() < deadline:
        state = container.exec_health()
        if state.get("status") in ("READY", "SETUP_FAILED"):
            return state
        if container.poll() is not None:
            raise RuntimeError(f"the container exited with status {container.returncode} before setup finished")
        time.sleep(0.5)
    raise TimeoutError(f"setup did not finish within {timeout:.0f} s (last health: {state})")


# ---- reporting ---------------------------------------------------------------------------------------------


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        """Run one check: ``fn`` returns what it measured, or raises ``AssertionError`` (or any error) to fail."""
        started = time.monotonic()
        try:
            detail = fn()
        except Exception as err:  # a broken check is a failed check, with its reason
            reason = str(err) or type(err).__name__
            print(f"FAIL  {name}: {reason} [{time.monotonic() - started:.0f} s]", flush=True)
            self.failures.append(name)
            return False
        print(f"PASS  {name}: {detail} [{time.monotonic() - started:.0f} s]", flush=True)
        return True

    def skip_as_failed(self, name: str, reason: str) -> None:
        print(f"FAIL  {name}: not run, {reason}", flush=True)
        self.failures.append(name)


# ---- HTTP helpers on top of the client -------------------------------------------------------------------------


def predict(url: str, inputs: dict, *, wait_if_busy: float = 10, timeout: float = 300) -> tuple[int, dict]:
    """client.post_prediction: a 409 (coglet still freeing the previous prediction's slot) is retried."""
    return client.post_prediction(url, inputs, timeout=timeout, retry_for=wait_if_busy)


def decoded_images(body: dict) -> list[Image.Image]:
    images = []
    for uri in body["output"]:
        image = Image.open(io.BytesIO(datauri.decode(uri)[1]))
        image.load()
        images.append(image)
    return images


def png_data_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, "PNG")
    return datauri.encode_bytes(buffer.getvalue(), "image/png")


def succeeded(status: int, body: dict) -> None:
    assert status == 200 and body.get("status") == "succeeded", (
        f"HTTP {status}, status {body.get('status')!r}: {error_text(status, body)}"
    )


# ---- the checks ----------------------------------------------------------------------------------------------


def check_image(docker: Docker, image: str, container: Container, expected_schema: dict) -> str:
    """/src holds the served files and nothing else from the build context; its schema is `cog_local.py schema`'s."""
    result = docker("cp", f"{container.name}:/src", "-")
    names, schema_text = [], None
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("src/").removeprefix("src")
            names.append(path)
            if path == ".cog/openapi_schema.json":
                schema_text = tar.extractfile(member).read().decode()
    missing = [path for path in REQUIRED if path not in names]
    assert not missing, f"/src lacks {missing}"
    leaked = sorted(path for path in names if FORBIDDEN & set(path.split("/")) or path.endswith(FORBIDDEN_SUFFIXES))
    assert not leaked, f"/src holds what the image must not: {leaked[:10]}"
    expected = json.dumps(expected_schema, indent=2, ensure_ascii=False) + "\n"
    assert schema_text == expected, "/src/.cog/openapi_schema.json differs from `scripts/cog_local.py schema`"
    size = int(docker.inspect(image, "{{.Size}}"))
    top = sorted({path.split("/")[0] for path in names if path})
    return f"image {size / 1e9:.2f} GB; /src = {', '.join(top)}; schema = cog_local.py schema"


def check_ready(url: str, container: Container, timeout: float) -> str:
    state = client.wait_for_setup(url, container, timeout)
    ready = time.monotonic() - container.started_at
    assert state["status"] == "READY", f"health is {state['status']}: {state.get('setup', {}).get('logs', '')[-800:]}"
    return f"READY {ready:.1f} s after start ({container.create_seconds:.1f} s more to create the container)"


def check_txt2img(url: str) -> str:
    started = time.monotonic()
    status, body = predict(url, FAST | {"prompt": "富士山 水彩", "width": 192, "num_outputs": 2, "seed": 3})
    succeeded(status, body)
    sizes = [image.size for image in decoded_images(body)]
    assert sizes == [(192, 128)] * 2, f"expected two 192×128 images, got {sizes}"
    return f"2 images 192×128 ({body['output'][0].split(';')[0]}) in {time.monotonic() - started:.1f} s"


def check_img2img(url: str) -> str:
    image = png_data_uri((300, 200))
    status, body = predict(url, FAST | {"prompt": "猫 油絵", "image": image, "prompt_strength": 0.6, "seed": 4})
    succeeded(status, body)
    sizes = [image.size for image in decoded_images(body)]
    assert sizes == [(128, 128)], f"expected one 128×128 image, got {sizes}"
    return "300×200 PNG in, one 128×128 image out"


def check_bad_input(url: str) -> str:
    status, body = predict(url, FAST | {"num_inference_steps": 0})
    message = error_text(status, body)
    assert status == 422, f"expected 422, got HTTP {status} {body.get('status', '')}: {message}"
    assert "num_inference_steps" in message, f"the 422 does not name the input: {message}"
    return f"num_inference_steps=0 → 422 ({message})"


def check_openapi(url: str, expected_schema: dict) -> str:
    served = client.fetch_schema(url)
    expected = expected_schema["components"]["schemas"]["Input"]
    assert served["components"]["schemas"]["Input"] == expected, "the served Input schema differs from the baked one"
    return f"HTTP 200, Input with {len(expected['properties'])} properties"


def training_zip() -> str:
    """A data URI of a two-image zip with Japanese captions in metadata.jsonl (the trainer's first caption source)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        lines = []
        for i, caption in enumerate(["赤い花の写真", "海辺の夕日"]):
            archive.writestr(f"{i}.png", datauri.decode(png_data_uri((96, 80)))[1])
            lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}, ensure_ascii=False))
        archive.writestr("metadata.jsonl", "\n".join(lines))
    return datauri.encode_bytes(buffer.getvalue(), "application/zip")


def check_training(url: str, container: Container, timeout: float) -> str:
    """The image in train mode (as Replicate starts it for a training): READY, and POST /trainings returns the .tar."""
    check_ready(url, container, timeout)
    inputs = {"input_images": training_zip(), "max_train_steps": 1, "resolution": 256, "lora_rank": 2, "seed": 0}
    started = time.monotonic()
    status, body = client.post_training(url, inputs, timeout=300)
    succeeded(status, body)
    weights = body["output"]["weights"]
    with tarfile.open(fileobj=io.BytesIO(datauri.decode(weights)[1])) as tar:
        names = sorted(tar.getnames())
    assert "lora.safetensors" in names and "lora_kohya.safetensors" in names, f"the trainer's .tar holds {names}"
    return f"--x-mode train: READY, 1-step LoRA training in {time.monotonic() - started:.1f} s → {', '.join(names)}"


def check_stop(docker: Docker, url: str, container: Container) -> str:
    """``docker stop`` while a prediction runs: the container exits on SIGTERM (not SIGKILL) within STOP_LIMIT."""
    outcome: dict = {}

    def long_prediction():
        try:
            outcome["response"] = client.post_prediction(url, LONG, timeout=600)
        except Exception as err:  # the server went away mid-request: what a stop looks like to a client
            outcome["error"] = repr(err)

    thread = threading.Thread(target=long_prediction, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while client.health(url).get("status") != "BUSY":
        assert time.monotonic() < deadline and thread.is_alive(), f"the prediction never started: {outcome}"
        time.sleep(0.1)
    time.sleep(1.0)  # inside the denoising loop
    pids = [int(line.split()[1]) for line in _text(docker("top", container.name).stdout).splitlines()[1:]]
    started = time.monotonic()
    docker("stop", container.name, timeout=60)
    elapsed = time.monotonic() - started
    thread.join(timeout=30)
    exit_code = container.poll()
    assert exit_code is not None, "the container still runs after docker stop"
    assert "response" not in outcome or outcome["response"][1].get("status") != "succeeded", (
        "the prediction finished before docker stop: make LONG longer"
    )
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"processes of the container still run on the host: {alive}"
    assert exit_code != 137, f"killed (exit 137) after {elapsed:.1f} s: SIGTERM did not stop the server"
    assert elapsed < STOP_LIMIT, f"docker stop took {elapsed:.1f} s (limit {STOP_LIMIT:.0f} s)"
    response = outcome.get("response")
    got = f"{response[1].get('status')} ({response[1].get('error')})" if response else outcome.get("error")
    return f"stopped in {elapsed:.1f} s, exit {exit_code}, its {len(pids)} processes gone; the client got: {got}"


def check_altered_weights(docker: Docker, container: Container, timeout: float, original: Path) -> str:
    """Alter the last bytes of a weights file in the created container (same size, still a loadable safetensors
    file: only the manifest's checksums can tell): setup must fail and name the file. The original is kept."""
    docker("cp", f"{container.name}:/src/{ALTERED_FILE}", str(original))
    altered = original.with_name(Path(ALTERED_FILE).name)
    data = bytearray(original.read_bytes())
    data[-16:] = bytes(byte ^ 0xFF for byte in data[-16:])  # tensor data (the header is at the start)
    altered.write_bytes(data)
    docker("cp", str(altered), f"{container.name}:/src/{ALTERED_FILE}")
    container.start()
    state = wait_for_setup_inside(container, timeout)
    logs = state.get("setup", {}).get("logs", "")
    assert state["status"] == "SETUP_FAILED", f"health is {state['status']} with 16 bytes of {ALTERED_FILE} altered"
    named = ALTERED_FILE.removeprefix("weights/")
    assert named in logs, f"the setup error does not name {named}: {logs[-600:]}"
    error = re.findall(rf"\w*Error: [^\n]*{re.escape(named)}[^\n]*", logs)
    return f"SETUP_FAILED: {(error or [named])[-1][:200]}"


def check_network_none(docker: Docker, container: Container, timeout: float, original: Path) -> str:
    """The altered-weights container, its file put back: with no network at all, setup reaches READY."""
    docker("stop", container.name, timeout=60)
    if original.exists():
        docker("cp", str(original), f"{container.name}:/src/{ALTERED_FILE}")
    assert docker.inspect(container.name, "{{.HostConfig.NetworkMode}}") == "none"
    container.start()
    state = wait_for_setup_inside(container, timeout)
    assert state["status"] == "READY", f"health is {state['status']}: {state.get('setup', {}).get('logs', '')[-800:]}"
    return f"READY {time.monotonic() - container.started_at:.1f} s after start, read with docker exec"


TORCH_REPORT = """import json, torch
try:
    arches = torch._C._cuda_getArchFlags()  # the GPU architectures the build holds kernels for
except AttributeError:
    arches = None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "gpu": torch.cuda.is_available(), "arches": arches}))
"""


def check_torch_cuda(docker: Docker, container: Container) -> str:
    """torch in the image is a CUDA build whose CUDA and cuDNN libraries load (no GPU needed to read them)."""
    result = docker("exec", container.name, "python", "-c", TORCH_REPORT, check=False, timeout=300)
    assert result.returncode == 0, (
        f"python -c 'import torch ...' failed in the container: {_text(result.stderr)[-800:]}"
    )
    report = json.loads(_text(result.stdout).strip().splitlines()[-1])
    assert report["cuda"], f"torch {report['torch']} in the image is not a CUDA build"
    assert report["cudnn"], f"torch {report['torch']} (CUDA {report['cuda']}) found no cuDNN"
    return (
        f"torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}, GPU visible: {report['gpu']}, "
        f"kernels for {report['arches']}"
    )


def run_cuda_checks(docker: Docker, image: str, setup_timeout: float) -> Report:
    """The CUDA image on a host without a GPU, in one container (each is a full copy of ~9 GB with vfs): torch's
    CUDA and cuDNN versions, the image's contents, READY on CPU, predictions, validation and the schema."""
    report = Report()
    port = client.free_port()
    url = f"http://127.0.0.1:{port}"
    server = Container(docker, image, network="host", env={"PORT": str(port)})
    try:
        print("Building the expected schema on this host (imports the predictor)...", flush=True)
        expected_schema = local.build_schema()
        # Before the start: a running server writes __pycache__ into /src.
        report.check("image contents", lambda: check_image(docker, image, server, expected_schema))
        server.start()
        report.check("torch CUDA build", lambda: check_torch_cuda(docker, server))
        if report.check("ready on CPU (network host)", lambda: check_ready(url, server, setup_timeout)):
            report.check("txt2img", lambda: check_txt2img(url))
            report.check("img2img", lambda: check_img2img(url))
            report.check("bad input → 422", lambda: check_bad_input(url))
            report.check("GET /openapi.json", lambda: check_openapi(url, expected_schema))
        else:
            print(server.logs(), flush=True)
            for name in ("txt2img", "img2img", "bad input → 422", "GET /openapi.json"):
                report.skip_as_failed(name, "the server never became READY")
    finally:
        server.remove()
    return report


def run_checks(docker: Docker, image: str, setup_timeout: float, workdir: Path) -> Report:
    """Three containers (each costs a full copy of the image with the vfs storage driver, and as long to remove)."""
    report = Report()
    removals: list[threading.Thread] = []

    def remove(container: Container) -> None:  # in the background: the next checks need not wait for it
        removals.append(threading.Thread(target=container.remove))
        removals[-1].start()

    containers: list[Container] = []
    try:
        print("Building the expected schema on this host (imports the predictor)...", flush=True)
        expected_schema = local.build_schema()
        offline = Container(docker, image, network="none")
        containers.append(offline)
        report.check("image contents", lambda: check_image(docker, image, offline, expected_schema))
        original = workdir / "original-weights-file"
        if not report.check(
            "altered weights → SETUP_FAILED", lambda: check_altered_weights(docker, offline, setup_timeout, original)
        ):
            print(offline.logs(), flush=True)

        port = client.free_port()
        url = f"http://127.0.0.1:{port}"
        server = Container(docker, image, network="host", env={"PORT": str(port)})
        containers.append(server)
        server.start()
        if report.check("ready (network host)", lambda: check_ready(url, server, setup_timeout)):
            report.check("txt2img", lambda: check_txt2img(url))
            report.check("img2img", lambda: check_img2img(url))
            report.check("bad input → 422", lambda: check_bad_input(url))
            report.check("GET /openapi.json", lambda: check_openapi(url, expected_schema))
            report.check("docker stop mid-prediction", lambda: check_stop(docker, url, server))
        else:
            print(server.logs(), flush=True)
            for name in ("txt2img", "img2img", "bad input → 422", "GET /openapi.json", "docker stop mid-prediction"):
                report.skip_as_failed(name, "the server never became READY")
        remove(containers.pop())

        if not report.check(
            "ready (network none)", lambda: check_network_none(docker, offline, setup_timeout, original)
        ):
            print(offline.logs(), flush=True)
        remove(containers.pop())

        port = client.free_port()
        url = f"http://127.0.0.1:{port}"
        command = ("python", "-m", "cog.server.http", "--x-mode", "train")
        trainer = Container(docker, image, network="host", env={"PORT": str(port)}, command=command)
        containers.append(trainer)
        trainer.start()
        if not report.check("training (train mode)", lambda: check_training(url, trainer, setup_timeout)):
            print(trainer.logs(), flush=True)
    finally:
        for container in containers:
            remove(container)
        for thread in removals:
            thread.join()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="jsd:cpu", help="image to check (default: %(default)s)")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker CLI to use")
    parser.add_argument("--setup-timeout", type=float, default=300, help="seconds to wait for setup() per container")
    parser.add_argument(
        "--cuda", action="store_true", help="the CUDA image on a host without a GPU: the checks that need none"
    )
    args = parser.parse_args(argv)
    docker = Docker(args.docker)
    docker("image", "inspect", args.image)  # a missing image fails here, with docker's message
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jsd-checks-") as tmp:
        try:
            if args.cuda:
                report = run_cuda_checks(docker, args.image, args.setup_timeout)
            else:
                report = run_checks(docker, args.image, args.setup_timeout, Path(tmp))
        except Exception as err:  # e.g. a container that cannot even be created: the checks cannot go on
            print(f"FAIL  container checks: stopped early, {err}", flush=True)
            return 1
    elapsed = time.monotonic() - started
    if report.failures:
        print(f"{len(report.failures)} container check(s) failed in {elapsed:.0f} s: {', '.join(report.failures)}")
        return 1
    print(f"All container checks passed in {elapsed:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
