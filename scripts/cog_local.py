"""Cog without Docker: serve predict.py with coglet (Cog 0.23's server), or run one prediction.

    .venv/bin/python scripts/cog_local.py serve --port 5000                  # http://127.0.0.1:5000/predictions
    .venv/bin/python scripts/cog_local.py predict -i prompt="サラリーマン 油絵" -i seed=42 -o outputs/
    .venv/bin/python scripts/cog_local.py predict -i image=@photo.png -i prompt_strength=0.6 -o outputs/
    .venv/bin/python scripts/cog_local.py schema                             # print the OpenAPI schema
    .venv/bin/python scripts/cog_local.py serve --train --port 5001          # the trainer: POST /trainings
    .venv/bin/python scripts/cog_local.py train -i input_images=@data.zip -i max_train_steps=500 -o out/

``serve`` writes ``.cog/openapi_schema.json`` from the predictor with Cog's own inspection (what
``cog build`` would do; without it coglet validates no input) and starts coglet with this venv's
``bin/`` first on ``PATH`` (coglet starts its worker with the ``python`` found there). ``predict``
takes ``cog predict``'s ``-i key=value`` inputs (file inputs as ``@path`` or a path), starts a server
on a free port (or uses ``--url``), writes the output files into ``-o DIR`` and exits non-zero with
the error when the prediction fails. A 409 (server busy) is retried with a short backoff, at most
10 s (:func:`post_json_with_retry`). Weights come from ``--weights`` (default ``$JSD_WEIGHTS`` or
``weights/``).

``serve --train`` runs coglet in train mode (``--x-mode train``, ``COG_TRAIN_TYPE_STUB=train.py:train``)
with the schema ``cog build`` writes for a model with both ``run:`` and ``train:`` (predict and train
schemas merged, ``TrainingInput``/``TrainingOutput`` included). ``train`` runs one training the same way
(``POST /trainings``) and writes the trained weights (the LoRA .tar) into ``-o DIR``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib.util
import json
import mimetypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREDICTOR_REF = "predict.py:Predictor"
TRAIN_REF = "train.py:train"
SCHEMA_PATH = Path(".cog") / "openapi_schema.json"  # where coglet looks, relative to its working directory


# ---- the OpenAPI schema, from Cog's own inspection of the predictor ------------------------------------


def openapi_schema(predictor_ref: str = PREDICTOR_REF) -> dict:
    """The OpenAPI document ``cog build`` writes, built from ``cog._inspector``'s view of the predictor.

    Input fields, their JSON types, defaults, bounds and choices all come from Cog's inspection
    (``create_predictor``), so the schema cannot drift from the ``run()`` signature.
    """
    from cog import _inspector

    path, class_name = predictor_ref.split(":")
    path = (REPO / path).resolve()
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # create_predictor imports the module by name
    spec.loader.exec_module(module)
    info = _inspector.create_predictor(path.stem, class_name)
    schemas = {"Input": _input_schema(info), "Output": info.output.json_type()}
    schemas |= {
        name: {"title": name, "description": "An enumeration.", "enum": field.choices}
        | field.type.primitive.json_type()
        for name, field in info.inputs.items()
        if field.choices is not None
    }
    schemas |= _envelope_schemas()
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def _input_schema(info) -> dict:
    from cog import _adt

    properties, required = {}, []
    for name, field in info.inputs.items():
        prop: dict = {"x-order": field.order}
        if field.choices is not None:
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop |= {"title": name.replace("_", " ").title()} | field.type.json_type()
        if field.default is not None:
            prop["default"] = field.type.json_encode(field.type.normalize(field.default))
        elif field.type.repetition in (_adt.Repetition.REQUIRED, _adt.Repetition.REPEATED):
            required.append(name)
        if field.type.repetition is _adt.Repetition.OPTIONAL:
            prop["nullable"] = True
        constraints = {
            "description": field.description,
            "minimum": _whole(field.ge),
            "maximum": _whole(field.le),
            "minLength": field.min_length,
            "maxLength": field.max_length,
            "pattern": field.regex,
        }
        prop |= {key: value for key, value in constraints.items() if value is not None}
        properties[name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    return schema | ({"required": required} if required else {})


def _whole(limit: float | None) -> float | int | None:
    """A limit as the user wrote it: cog keeps ``le=8`` as 8.0, and coglet's messages would say "8.0"."""
    return int(limit) if isinstance(limit, float) and limit.is_integer() else limit


def _paths() -> dict:
    ok = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
    invalid = {
        "422": {
            "description": "Validation Error",
            "content": {"application/json": {"schema": _ref("HTTPValidationError")}},
        }
    }
    body = {"content": {"application/json": {"schema": _ref("PredictionRequest")}}}
    response = {
        "200": {
            "description": "Successful Response",
            "content": {"application/json": {"schema": _ref("PredictionResponse")}},
        }
    }
    cancel_param = {
        "required": True,
        "schema": {"title": "Prediction Id", "type": "string"},
        "name": "prediction_id",
        "in": "path",
    }
    return {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": ok}},
        "/health-check": {
            "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": ok}
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": body,
                "responses": response | invalid,
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [cancel_param],
                "responses": ok | invalid,
            }
        },
    }


def _envelope_schemas() -> dict:
    text = {"type": "string"}
    when = {"type": "string", "format": "date-time"}
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": text, "input": _ref("Input")},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": _ref("Input"),
                "output": _ref("Output"),
                "id": text,
                "version": text,
                "created_at": when,
                "started_at": when,
                "completed_at": when,
                "status": text,
                "error": text,
                "logs": text,
                "metrics": {"type": "object"},
            },
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"type": "array", "items": _ref("ValidationError")}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": text,
                "type": text,
            },
        },
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def write_schema(workdir: Path, predictor_ref: str = PREDICTOR_REF, *, schema: dict | None = None) -> Path:
    """Write ``workdir/.cog/openapi_schema.json`` (atomically: other servers may be reading it).

    ``schema``: one already built by :func:`openapi_schema` (which imports the predictor); built here if not given.
    """
    schema = schema if schema is not None else openapi_schema(predictor_ref)
    path = workdir / SCHEMA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---- coglet ----------------------------------------------------------------------------------------


def server_command(host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "cog.server.http", "--host", host]


def server_env(port: int, weights: str | os.PathLike, predictor_ref: str = PREDICTOR_REF) -> dict[str, str]:
    """coglet's environment: the predictor (absolute, so any working directory works), port, weights and PATH."""
    path, class_name = predictor_ref.split(":")
    env = dict(os.environ)
    env["COG_PREDICT_TYPE_STUB"] = f"{(REPO / path).resolve()}:{class_name}"
    env["PORT"] = str(port)
    env["JSD_WEIGHTS"] = str(Path(weights).resolve())
    # coglet starts its worker with the `python` on PATH: it must be this interpreter's venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str) -> dict:
    """``GET /health-check`` as JSON; ``{"status": "UNREACHABLE"}`` while the server is not listening."""
    try:
        with urllib.request.urlopen(f"{url}/health-check", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return {"status": "UNREACHABLE"}


def wait_for_setup(url: str, process: subprocess.Popen | None, timeout: float) -> dict:
    """Poll health until READY or SETUP_FAILED (returned), or raise if the server dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    state = {"status": "not polled"}  # a timeout <= 0 polls nothing
    while time.monotonic() < deadline:
        state = health(url)
        if state.get("status") in ("READY", "SETUP_FAILED"):
            return state
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"coglet exited with status {process.returncode} before setup finished.")
        time.sleep(0.25)
    raise TimeoutError(f"coglet at {url} did not finish setup within {timeout:.0f} s (last health: {state}).")


@contextlib.contextmanager
def running_server(
    weights: str | os.PathLike,
    *,
    workdir: Path,
    port: int | None = None,
    log=None,
    schema: dict | None = None,
    train: bool = False,
):
    """Start coglet on 127.0.0.1 (schema written first); yields ``(url, process)``; always stops it.

    ``schema``: the OpenAPI schema when the caller already built it (else built here: the predictor's, or
    with ``train`` the combined predictor + trainer schema). ``train``: coglet in train mode (``/trainings``).
    """
    port = port or free_port()
    if train:
        write_schema(workdir, schema=schema if schema is not None else combined_schema())
        command, env = train_server_command(), train_server_env(port, weights)
    else:
        write_schema(workdir, schema=schema)
        command, env = server_command(), server_env(port, weights)
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it also stops its worker
    )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop coglet and its worker (the process group this script started), forcefully if they linger.

    SIGTERM goes to coglet alone: it then stops its worker through their control channel, and the worker
    exits normally, running the predictor's exit handlers (``jsd.scratch`` removes the output folder). A
    SIGTERM to the whole group would kill the worker at once (it keeps SIGTERM's default action).
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    _wait_for_group(process.pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived coglet


def _wait_for_group(pgid: int, timeout: float) -> None:
    """Wait until no process of group ``pgid`` is left (the worker finishing its exit), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# ---- predictions ----------------------------------------------------------------------------------


RETRY_FOR = 10.0  # seconds: the longest post_json_with_retry keeps retrying a 409, in all
FIRST_BACKOFF = 0.05  # seconds before the first retry; doubled after each, up to MAX_BACKOFF
MAX_BACKOFF = 2.0


def post_json_with_retry(
    url: str,
    path: str,
    body: dict,
    timeout: float | None = None,
    *,
    retry_for: float = RETRY_FOR,
    log=None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """``POST url+path`` with a JSON body; returns the HTTP status and the JSON answer.

    A 409 ("At capacity": another prediction or training holds the slot) is retried with exponential
    backoff (50 ms, doubled up to 2 s, plus up to 20 % jitter) for at most ``retry_for`` seconds in all,
    then returned. coglet answers a synchronous request a moment *before* it frees its slot, so a
    request sent straight after a 200 can get a 409 even from a client that sends one at a time
    (``scripts/repro_coglet.py``). A 409 has done no work, so sending the request again is safe. Every
    other status is returned at once. ``log`` receives one line per retry (default: standard error).
    ``headers``: extra request headers (``Prefer: respond-async`` for an async prediction, answered 202).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    deadline = time.monotonic() + retry_for
    backoff = FIRST_BACKOFF
    attempt = 0
    while True:
        status, answer = _post_json(f"{url}{path}", body, timeout, headers)
        left = deadline - time.monotonic()
        if status != 409 or left <= 0:
            return status, answer
        attempt += 1
        wait = min(backoff * (1 + 0.2 * random.random()), left)
        log(f"{path}: 409 ({answer.get('error') or answer.get('detail') or 'busy'}); retry {attempt} in {wait:.2f} s")
        time.sleep(wait)
        backoff = min(backoff * 2, MAX_BACKOFF)


def _post_json(url: str, body: dict, timeout: float | None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | (headers or {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except json.JSONDecodeError:
            return err.code, {"detail": raw.decode(errors="replace")}


def post_prediction(
    url: str, inputs: dict, *, timeout: float | None = None, retry_for: float = RETRY_FOR
) -> tuple[int, dict]:
    """``POST /predictions`` (synchronous), a 409 retried for up to ``retry_for`` s; (HTTP status, JSON body)."""
    return post_json_with_retry(url, "/predictions", {"input": inputs}, timeout, retry_for=retry_for)


def parse_inputs(pairs: list[str], schema: dict) -> dict:
    """``key=value`` strings typed by the schema, like ``cog predict -i``; file inputs become data URIs."""
    properties = schema["components"]["schemas"]["Input"]["properties"]
    inputs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i expects key=value, got {pair!r}.")
        if key not in properties:
            raise SystemExit(f"Unknown input {key!r}; inputs are: {', '.join(properties)}.")
        inputs[key] = _typed(key, value, _json_type(properties[key], schema))
    return inputs


def _json_type(prop: dict, schema: dict) -> dict:
    if "allOf" in prop:  # choices live in their own component
        return schema["components"]["schemas"][prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]
    return prop


def _typed(key: str, value: str, prop: dict):
    kind = prop.get("type")
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
    except ValueError:
        return value  # sent as typed; the server's validation names the input
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.lower(), value)
    remote = value.startswith(("http://", "https://", "data:"))
    if prop.get("format") == "uri" and not remote:
        return _data_uri(key, Path(value.removeprefix("@")))
    if _takes_a_file(prop) and not remote and (value.startswith("@") or Path(value).is_file()):
        return _data_uri(key, Path(value.removeprefix("@")))
    return value


def _takes_a_file(prop: dict) -> bool:
    """A text input that also takes a file as a data URI (``lora_weights``: "an http(s) URL, data URI or path").

    A local file given to it, as ``@path`` (``cog predict``'s habit for files) or a plain path, is sent as a
    data URI: the server may run in another folder, or on another machine.
    """
    return prop.get("type") == "string" and "data URI" in prop.get("description", "")


def _data_uri(key: str, path: Path) -> str:
    if not path.is_file():
        raise SystemExit(f"-i {key}: no such file {path} (relative paths start from {Path.cwd()}).")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def write_outputs(output, folder: Path) -> list[Path]:
    """Decode the data URIs coglet returns (no upload URL set) into ``folder/output.{i}.{ext}``."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = output if isinstance(output, list) else [output]
    paths = []
    for index, uri in enumerate(outputs):
        header, _, payload = uri.partition(",")
        mime = header.removeprefix("data:").split(";")[0]
        ext = (
            {"image/webp": ".webp", "image/png": ".png", "image/jpeg": ".jpg"}.get(mime)
            or mimetypes.guess_extension(mime)
            or ""
        )
        path = folder / f"output.{index}{ext}"
        path.write_bytes(base64.b64decode(payload))
        paths.append(path)
    return paths


# coglet 0.23 wraps the message of an exception raised by run() twice, and adds its class:
# "Prediction failed: Prediction failed: InputError: `prompt` contains ...". One "Prediction failed: "
# comes from coglet-python (predictor.rs: format!("Prediction failed: {}", err)), the other from
# coglet's PredictionError::Failed (#[error("Prediction failed: {0}")]), and "InputError: " from
# pyo3's Display of a Python exception ("{type qualname}: {str(exc)}"). None of it is ours. A failed
# training reads "Prediction failed: Training failed: ValueError: ..." the same way.
_COGLET_WRAPPING = re.compile(
    r"^(?:(?:Async prediction|Prediction|Async training|Training) failed: )+"
    r"(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit): )?"
)


def clean_error(text: str) -> str:
    """The message a failed prediction's ``error`` carries, without coglet's wrapping (see above).

    ``clean_error("Prediction failed: Prediction failed: InputError: `mask` was given without `image`: ...")``
    is ``"`mask` was given without `image`: ..."``; a text without that wrapping comes back unchanged.
    """
    return _COGLET_WRAPPING.sub("", text, count=1)


# coglet 0.23's health after a failed setup() ends its setup logs with the exception, wrapped the same way plus the
# worker's slot id: "worker setup failed: worker setup failed (slot 3f…): Setup failed: setup failed: ScorerError: …"
_SETUP_WRAPPING = re.compile(
    r"^(?:(?:worker setup failed|[Ss]etup failed)(?: \(slot [\w-]+\))?: )+(?:[A-Za-z_][\w.]*(?:Error|Exception): )?"
)


def setup_error(state: dict) -> str:
    """The exception that failed ``setup()``, in one line without coglet's wrapping (see above), from a health
    state; the whole server log stays in the log file."""
    logs = (state.get("setup") or {}).get("logs") or ""
    lines = [line for line in logs.splitlines() if line.strip()]
    return _SETUP_WRAPPING.sub("", lines[-1], count=1) if lines else f"health {state}"


def error_text(status: int, body: dict) -> str:
    """What went wrong, in one line: a 422's ``detail[].loc/msg``, a failed prediction's ``error``, else the body.

    A long value the server echoes is cut (:func:`shorten_echoes`).
    """
    if status == 422 and isinstance(body.get("detail"), list):
        text = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in body["detail"])
    elif body.get("error"):
        text = clean_error(str(body["error"]))
    else:
        text = str(body.get("detail") or body)
    return shorten_echoes(text)


SHOWN_CHARS = 80  # of an echoed value: the reason must not drown after 2,000 characters
# coglet's 422 quotes the whole value before the reason: `"猫猫…(2,345 characters)…" is longer than 2000 characters`
_LONG_QUOTED = re.compile(rf'"((?:[^"\\]|\\.){{{SHOWN_CHARS + 1},}})"', flags=re.DOTALL)


def shorten_echoes(text: str) -> str:
    """Each quoted value longer than :data:`SHOWN_CHARS`, cut to its start and length: ``"猫…" (2,345 characters)``."""

    def cut(match: re.Match) -> str:
        try:
            value = json.loads(match.group(0))  # the JSON string coglet wrote
        except json.JSONDecodeError:
            value = match.group(1)
        return f'"{value[:SHOWN_CHARS]}…" ({len(value):,} characters)'

    return _LONG_QUOTED.sub(cut, text)


# ---- trainings (train mode) -------------------------------------------------------------------------


def _inspect_ref(ref: str):
    """Cog's inspection (``cog._inspector``) of ``FILE.py:NAME``, a predictor class or a train function."""
    from cog import _inspector

    path, name = ref.split(":")
    path = (REPO / path).resolve()
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # create_predictor imports the module by name
    spec.loader.exec_module(module)
    return _inspector.create_predictor(path.stem, name)


def training_schema(train_ref: str = TRAIN_REF) -> dict:
    """The train-mode OpenAPI document of cog's schema generator (``pkg/schema/openapi_spec.go``, ``isTrain``).

    ``TrainingInput``/``TrainingOutput`` in place of ``Input``/``Output``, ``/trainings`` in place of
    ``/predictions``; the fields come from Cog's inspection of ``train()`` as for the predictor.
    """
    info = _inspect_ref(train_ref)
    inputs = _input_schema(info) | {"title": "TrainingInput"}
    schemas = {"TrainingInput": inputs, "TrainingOutput": info.output.json_type() | {"title": "TrainingOutput"}}
    schemas |= {
        name: {"title": name, "description": "An enumeration.", "enum": field.choices}
        | field.type.primitive.json_type()
        for name, field in info.inputs.items()
        if field.choices is not None
    }
    envelope = _envelope_schemas()
    for kind in ("Request", "Response"):
        body = json.loads(json.dumps(envelope[f"Prediction{kind}"]).replace('/Input"', '/TrainingInput"'))
        body = json.loads(json.dumps(body).replace('/Output"', '/TrainingOutput"'))
        schemas[f"Training{kind}"] = body | {"title": f"Training{kind}"}
    schemas |= {name: envelope[name] for name in ("HTTPValidationError", "ValidationError")}
    paths = json.loads(
        json.dumps(_paths())
        .replace("/predictions", "/trainings")
        .replace("prediction_id", "training_id")
        .replace("Prediction Id", "Training Id")
        .replace("PredictionRequest", "TrainingRequest")
        .replace("PredictionResponse", "TrainingResponse")
        .replace("predict_predictions_post", "train_trainings_post")
        .replace("cancel_predictions__", "cancel_trainings__")
        .replace('"Predict"', '"Train"')
        .replace("Run a single prediction on the model", "Run a single training on the model")
    )
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def combined_schema(predictor_ref: str = PREDICTOR_REF, train_ref: str = TRAIN_REF) -> dict:
    """What ``cog build`` writes for a model with ``run:`` and ``train:`` (cog's ``MergeSchemas``): the
    predict schema, plus the train schema's paths and components it lacks."""
    merged, train = openapi_schema(predictor_ref), training_schema(train_ref)
    for key in ("paths",):
        merged[key] |= {k: v for k, v in train[key].items() if k not in merged[key]}
    schemas = merged["components"]["schemas"]
    schemas |= {k: v for k, v in train["components"]["schemas"].items() if k not in schemas}
    return merged


def train_server_command(host: str = "127.0.0.1") -> list[str]:
    return [*server_command(host), "--x-mode", "train"]


def train_server_env(port: int, weights: str | os.PathLike, train_ref: str = TRAIN_REF) -> dict[str, str]:
    """:func:`server_env` plus ``COG_TRAIN_TYPE_STUB`` (absolute), which coglet reads in train mode."""
    path, name = train_ref.split(":")
    return server_env(port, weights) | {"COG_TRAIN_TYPE_STUB": f"{(REPO / path).resolve()}:{name}"}


def post_training(
    url: str, inputs: dict, *, timeout: float | None = None, retry_for: float = RETRY_FOR
) -> tuple[int, dict]:
    """``POST /trainings`` (synchronous), a 409 retried for up to ``retry_for`` s; (HTTP status, JSON body)."""
    return post_json_with_retry(url, "/trainings", {"input": inputs}, timeout, retry_for=retry_for)


def parse_training_inputs(pairs: list[str], schema: dict) -> dict:
    """``-i key=value`` typed by the schema's ``TrainingInput`` (file inputs become data URIs)."""
    schemas = schema["components"]["schemas"]
    return parse_inputs(pairs, {"components": {"schemas": schemas | {"Input": schemas["TrainingInput"]}}})


def write_training_output(output: dict, folder: Path) -> list[Path]:
    """Each file of a training's output object (``weights``) into ``folder/{key}{ext}``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, uri in output.items():
        header, _, payload = uri.partition(",")
        mime = header.removeprefix("data:").split(";")[0]
        ext = {"application/x-tar": ".tar"}.get(mime) or mimetypes.guess_extension(mime) or ""
        path = folder / f"{key}{ext}"
        path.write_bytes(base64.b64decode(payload))
        paths.append(path)
    return paths


def cmd_train(args) -> int:
    if args.url:
        url = args.url.rstrip("/")
        return _train_at(url, parse_training_inputs(args.input, fetch_schema(url)), args)
    schema = combined_schema()  # built once: it imports the predictor and the trainer
    inputs = parse_training_inputs(args.input, schema)
    return _at_local_server(args, schema, train=True, then=lambda url: _train_at(url, inputs, args))


def _train_at(url: str, inputs: dict, args) -> int:
    status, body = post_training(url, inputs)
    write = functools.partial(write_training_output, folder=Path(args.output))
    return finish_job("Training", url, status, body, write, names=sent_file_names(args.input, inputs))


def cmd_serve_train(args) -> int:
    path = write_schema(REPO, schema=combined_schema())
    print(f"Wrote {path}; training on http://{args.host}:{args.port} with weights {args.weights}", file=sys.stderr)
    return serve_until_interrupted(train_server_command(args.host), train_server_env(args.port, args.weights))


# ---- command line ---------------------------------------------------------------------------------


def cog_yaml_train_ref(cog_yaml: Path = REPO / "cog.yaml") -> str | None:
    """cog.yaml's ``train:`` reference (``train.py:train``), or None when the model has no trainer."""
    match = re.search(r"""^train:\s*["']?([^"'\s#]+)""", cog_yaml.read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


def build_schema() -> dict:
    """The schema ``cog build`` bakes into the image: the predictor's, merged with the trainer's when cog.yaml
    has ``train:`` (cog's ``MergeSchemas``), so the same image also serves ``--x-mode train`` on Replicate."""
    train_ref = cog_yaml_train_ref()
    return combined_schema(train_ref=train_ref) if train_ref else openapi_schema()


def cmd_schema(args) -> int:
    print(json.dumps(build_schema(), indent=2, ensure_ascii=False))
    return 0


def cmd_serve(args) -> int:
    if args.train:
        return cmd_serve_train(args)
    path = write_schema(REPO)
    print(f"Wrote {path}; serving on http://{args.host}:{args.port} with weights {args.weights}", file=sys.stderr)
    return serve_until_interrupted(server_command(args.host), server_env(args.port, args.weights))


def serve_until_interrupted(command: list[str], env: dict[str, str]) -> int:
    """Run the server in its own process group until it exits, or until Ctrl+C stops it: one line, no traceback.

    Ctrl+C reaches only this process (the server's group is its own), which then stops the server the way
    :func:`stop_server` always does, so nothing of coglet's shutdown reaches the terminal as a traceback.
    """
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_server(process)
        print("Stopped the server (Ctrl+C).", file=sys.stderr)
        return 130


def fetch_schema(url: str) -> dict:
    """A running server's ``GET /openapi.json``."""
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as response:
        return json.load(response)


def cmd_predict(args) -> int:
    if args.url:  # the server's own schema: no need to import the predictor here
        url = args.url.rstrip("/")
        return _predict_at(url, parse_inputs(args.input, fetch_schema(url)), args)
    schema = openapi_schema()  # built once: it imports the predictor, torch and diffusers
    inputs = parse_inputs(args.input, schema)
    return _at_local_server(args, schema, train=False, then=lambda url: _predict_at(url, inputs, args))


def _at_local_server(args, schema: dict, *, train: bool, then) -> int:
    """Start coglet on 127.0.0.1 (log in .cog/), wait for setup, return ``then(url)``; the server always stops."""
    log_path = REPO / ".cog" / ("coglet-train.log" if train else "coglet.log")
    log_path.parent.mkdir(exist_ok=True)
    mode = " in train mode" if train else ""
    print(f"Starting coglet{mode} (setup can take a minute; server log: {log_path})", file=sys.stderr)
    with (
        open(log_path, "wb") as log,
        running_server(args.weights, workdir=REPO, log=log, schema=schema, train=train) as (url, process),
    ):
        state = wait_for_setup(url, process, args.setup_timeout)
        if state["status"] != "READY":
            print(f"Setup failed (--weights {args.weights}): {setup_error(state)}", file=sys.stderr)
            return 1
        return then(url)


def _predict_at(url: str, inputs: dict, args) -> int:
    status, body = post_prediction(url, inputs)

    def write(output) -> list[Path]:
        return [*write_outputs(output, Path(args.output)), *write_metrics(body.get("metrics"), Path(args.output))]

    return finish_job("Prediction", url, status, body, write, names=sent_file_names(args.input, inputs))


METRICS_FILE = "metrics.json"


def write_metrics(metrics: dict | None, folder: Path) -> list[Path]:
    """The prediction's metrics (``predict_time``, the token counts, best-of-N's ``candidates``…) into
    ``folder/metrics.json``, beside the outputs: a candidate's ``output`` is the index in ``output.{i}.*``."""
    if not metrics:
        return []
    path = folder / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [path]


def finish_job(kind: str, url: str, status: int, body: dict, write, *, names: dict[str, str] | None = None) -> int:
    """Print a prediction's or training's logs and its outcome in one sentence, write its outputs; 0 on success.

    ``kind``: "Prediction" or "Training" (the failure reads "Training failed: `input_images` …");
    ``write(output)`` writes the files and returns their paths; ``names``: the local file sent for an input,
    shown after the input's name in the error (the server only saw a data URI).
    """
    remove_coglet_folder(url, body.get("id"))
    if body.get("logs"):
        print(body["logs"].rstrip(), file=sys.stderr)
    if status == 200 and body.get("status") == "succeeded":
        for path in write(body["output"]):
            print(path)
        return 0
    error = with_file_names(error_text(status, body), names or {})
    if status == 200:
        print(f"{kind} {body.get('status')}: {error}", file=sys.stderr)
    else:
        what = "Invalid input" if status == 422 else f"The server answered HTTP {status}"
        print(f"{what}: {error}", file=sys.stderr)
    return 1


def sent_file_names(pairs: list[str], inputs: dict) -> dict[str, str]:
    """``{input: file name}`` for every ``-i key=@path`` (or path) sent as a data URI."""
    names = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if str(inputs.get(key, "")).startswith("data:") and not value.startswith("data:"):
            names[key] = Path(value.removeprefix("@")).name
    return names


def with_file_names(error: str, names: dict[str, str]) -> str:
    """``error`` with the user's file name after each input that names none: "`input_images` (data.zip) …"."""
    for key, name in names.items():
        error = re.sub(rf"`{re.escape(key)}`(?! \()", lambda _, key=key, name=name: f"`{key}` ({name})", error, count=1)
    return error


# coglet 0.23 makes /tmp/coglet/predictions/{id}/inputs and .../outputs for every prediction and training
# (a fixed path in coglet's Rust code, whatever TMPDIR says) and leaves them behind, empty.
COGLET_JOBS = Path("/tmp/coglet/predictions")


def remove_coglet_folder(url: str, job_id: str | None) -> None:
    """Remove coglet's empty folder of a finished job, when the server runs on this machine."""
    host = urllib.parse.urlsplit(url).hostname
    folder = COGLET_JOBS / str(job_id)
    if not job_id or host not in ("127.0.0.1", "localhost", "::1") or not folder.is_dir() or folder.is_symlink():
        return
    if not any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):  # only ever empty folders
        shutil.rmtree(folder, ignore_errors=True)


def _job_parser(sub, name: str, job: str, outputs: str, weights: str, weights_help: str) -> argparse.ArgumentParser:
    """The ``predict`` and ``train`` commands take the same options: inputs, output folder, server or weights."""
    parser = sub.add_parser(name, help=f"run {job} and write {outputs}")
    parser.add_argument("-i", "--input", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-o", "--output", default=".", metavar="DIR", help=f"folder for {outputs}")
    parser.add_argument("--weights", default=weights, help=f"{weights_help} (default: %(default)s)")
    parser.add_argument("--url", help="use a running server (train mode for train) instead of starting one")
    parser.add_argument("--setup-timeout", type=float, default=600, help="seconds to wait for setup()")
    return parser


def main(argv: list[str] | None = None) -> int:
    if importlib.util.find_spec("cog") is None:  # started by a Python without the project's packages
        from _venv import exit_with_hint  # this file's folder is sys.path[0]

        exit_with_hint("cog")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    weights = os.environ.get("JSD_WEIGHTS", "weights")
    serve = sub.add_parser("serve", help="start coglet on --host:--port")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--weights", default=weights, help="served checkpoint folder (default: %(default)s)")
    serve.add_argument("--train", action="store_true", help="serve the trainer (POST /trainings) instead")
    serve.set_defaults(func=cmd_serve)
    predict = _job_parser(sub, "predict", "one prediction", "the output files", weights, "served checkpoint folder")
    predict.set_defaults(func=cmd_predict)
    train = _job_parser(sub, "train", "one training (LoRA)", "the weights .tar", weights, "base checkpoint folder")
    train.set_defaults(func=cmd_train)
    sub.add_parser("schema", help="print the OpenAPI schema").set_defaults(func=cmd_schema)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
