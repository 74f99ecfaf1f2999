"""Cog without Docker: the OpenAPI schema ``cog build`` writes, and coglet (Cog 0.23's server) as a local process.

The model folder (``root``) holds ``predict.py``, ``train.py`` and ``cog.yaml``: the checkout this package
sits in, else the working directory. The schema comes from Cog's own inspection (``cog._inspector``) of
the predictor and the trainer, so it cannot drift from their signatures; without it coglet validates no
input. coglet starts its worker with the ``python`` on ``PATH``, so this interpreter's ``bin/`` goes first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from jsd.coghttp.client import free_port

PREDICTOR_REF = "predict.py:Predictor"
TRAIN_REF = "train.py:train"
SCHEMA_PATH = Path(".cog") / "openapi_schema.json"  # where coglet looks, relative to its working directory


def default_root() -> Path:
    """The model folder: the checkout holding this package when it has ``predict.py``, else the working directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "predict.py").is_file() else Path.cwd()


ROOT = default_root()


# ---- the OpenAPI schema, from Cog's own inspection ---------------------------------------------------


def inspect_ref(ref: str, root: Path = ROOT):
    """Cog's inspection (``cog._inspector``) of ``FILE.py:NAME`` in ``root``: a predictor class or a train function."""
    from cog import _inspector

    relative, name = ref.split(":")
    path = (root / relative).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run this from the model's folder (the one holding {relative})")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # create_predictor imports the module by name
    spec.loader.exec_module(module)
    return _inspector.create_predictor(path.stem, name)


def openapi_schema(predictor_ref: str = PREDICTOR_REF, root: Path = ROOT) -> dict:
    """The OpenAPI document ``cog build`` writes for the predictor: fields, JSON types, defaults, bounds, choices."""
    info = inspect_ref(predictor_ref, root)
    schemas = {"Input": _input_schema(info), "Output": info.output.json_type()}
    schemas |= _choice_schemas(info) | _envelope_schemas()
    return _document(_paths(), schemas)


def training_schema(train_ref: str = TRAIN_REF, root: Path = ROOT) -> dict:
    """The train-mode OpenAPI document of cog's schema generator (``pkg/schema/openapi_spec.go``, ``isTrain``).

    ``TrainingInput``/``TrainingOutput`` in place of ``Input``/``Output``, ``/trainings`` in place of
    ``/predictions``; the fields come from Cog's inspection of ``train()`` as for the predictor.
    """
    info = inspect_ref(train_ref, root)
    inputs = _input_schema(info) | {"title": "TrainingInput"}
    schemas = {"TrainingInput": inputs, "TrainingOutput": info.output.json_type() | {"title": "TrainingOutput"}}
    schemas |= _choice_schemas(info)
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
    return _document(paths, schemas)


def combined_schema(predictor_ref: str = PREDICTOR_REF, train_ref: str = TRAIN_REF, root: Path = ROOT) -> dict:
    """What ``cog build`` writes for a model with ``run:`` and ``train:`` (cog's ``MergeSchemas``): the
    predict schema, plus the train schema's paths and components it lacks."""
    merged, train = openapi_schema(predictor_ref, root), training_schema(train_ref, root)
    merged["paths"] |= {k: v for k, v in train["paths"].items() if k not in merged["paths"]}
    schemas = merged["components"]["schemas"]
    schemas |= {k: v for k, v in train["components"]["schemas"].items() if k not in schemas}
    return merged


def cog_yaml_train_ref(root: Path = ROOT) -> str | None:
    """cog.yaml's ``train:`` reference (``train.py:train``), or None when the model has no trainer."""
    match = re.search(r"""^train:\s*["']?([^"'\s#]+)""", (root / "cog.yaml").read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


def build_schema(root: Path = ROOT) -> dict:
    """The schema ``cog build`` bakes into the image: the predictor's, merged with the trainer's when cog.yaml
    has ``train:`` (cog's ``MergeSchemas``), so the same image also serves ``--x-mode train`` on Replicate."""
    train_ref = cog_yaml_train_ref(root)
    return combined_schema(train_ref=train_ref, root=root) if train_ref else openapi_schema(root=root)


def write_schema(workdir: Path, schema: dict) -> Path:
    """Write ``workdir/.cog/openapi_schema.json`` (atomically: other servers may be reading it)."""
    path = workdir / SCHEMA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


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


def _choice_schemas(info) -> dict:
    """An enumeration component for each input with choices (cog's ``allOf`` reference points at it)."""
    return {
        name: {"title": name, "description": "An enumeration.", "enum": field.choices}
        | field.type.primitive.json_type()
        for name, field in info.inputs.items()
        if field.choices is not None
    }


def _document(paths: dict, schemas: dict) -> dict:
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


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


# ---- coglet ----------------------------------------------------------------------------------------


def server_command(host: str = "127.0.0.1", *, train: bool = False) -> list[str]:
    """coglet's command line; ``train``: train mode (``/trainings``)."""
    return [sys.executable, "-m", "cog.server.http", "--host", host, *(["--x-mode", "train"] if train else [])]


def server_env(
    port: int, weights: str | os.PathLike, *, train: bool = False, root: Path = ROOT, train_ref: str = TRAIN_REF
) -> dict[str, str]:
    """coglet's environment: the predictor (absolute, so any working directory works), port, weights and PATH;
    with ``train`` also ``COG_TRAIN_TYPE_STUB``, which coglet reads in train mode."""
    path, class_name = PREDICTOR_REF.split(":")
    env = dict(os.environ)
    env["COG_PREDICT_TYPE_STUB"] = f"{(root / path).resolve()}:{class_name}"
    env["PORT"] = str(port)
    env["JSD_WEIGHTS"] = str(Path(weights).resolve())
    # coglet starts its worker with the `python` on PATH: it must be this interpreter's venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if train:
        path, name = train_ref.split(":")
        env["COG_TRAIN_TYPE_STUB"] = f"{(root / path).resolve()}:{name}"
    return env


@contextlib.contextmanager
def running_server(
    weights: str | os.PathLike,
    *,
    workdir: Path,
    port: int | None = None,
    log: IO[bytes] | None = None,
    schema: dict | None = None,
    train: bool = False,
    root: Path = ROOT,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start coglet on 127.0.0.1 (schema written first); yields ``(url, process)``; always stops it.

    ``schema``: the OpenAPI schema when the caller already built it (else built here: the predictor's, or
    with ``train`` the combined predictor + trainer schema). ``train``: coglet in train mode (``/trainings``).
    """
    port = port or free_port()
    if schema is None:
        schema = combined_schema(root=root) if train else openapi_schema(root=root)
    write_schema(workdir, schema)
    process = subprocess.Popen(
        server_command(train=train),
        cwd=workdir,
        env=server_env(port, weights, train=train, root=root),
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it also stops its worker
    )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop coglet and its worker (the process group :func:`running_server` started), forcefully if they linger.

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


# coglet 0.23 makes /tmp/coglet/predictions/{id}/inputs and .../outputs for every prediction and training
# (a fixed path in coglet's Rust code, whatever TMPDIR says) and leaves them behind, empty.
COGLET_JOBS = Path("/tmp/coglet/predictions")


def remove_job_folder(url: str, job_id: str | None) -> None:
    """Remove coglet's empty folder of a finished job, when the server runs on this machine."""
    import shutil
    import urllib.parse

    host = urllib.parse.urlsplit(url).hostname
    folder = COGLET_JOBS / str(job_id)
    if not job_id or host not in ("127.0.0.1", "localhost", "::1") or not folder.is_dir() or folder.is_symlink():
        return
    if not any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):  # only ever empty folders
        shutil.rmtree(folder, ignore_errors=True)
