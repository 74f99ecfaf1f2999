"""Cog without Docker: serve predict.py with coglet (Cog 0.23's server), or run one prediction.

    .venv/bin/python scripts/cog_local.py serve --port 5000                  # http://127.0.0.1:5000/predictions
    .venv/bin/python scripts/cog_local.py predict -i prompt="サラリーマン 油絵" -i seed=42 -o outputs/
    .venv/bin/python scripts/cog_local.py predict -i image=@photo.png -i prompt_strength=0.6 -o outputs/
    .venv/bin/python scripts/cog_local.py schema                             # print the OpenAPI schema
    .venv/bin/python scripts/cog_local.py serve --train --port 5001          # the trainer: POST /trainings
    .venv/bin/python scripts/cog_local.py train -i input_images=@data.zip -i max_train_steps=500 -o out/

``serve`` writes ``.cog/openapi_schema.json`` from the predictor with Cog's own inspection (what
``cog build`` would do; without it coglet validates no input) and starts coglet. ``predict`` takes
``cog predict``'s ``-i key=value`` inputs (file inputs as ``@path`` or a path), starts a server on a free
port (or uses ``--url``), writes the output files into ``-o DIR`` and exits non-zero with the error when
the prediction fails. A 409 (server busy) is retried with a short backoff, at most 10 s. Weights come
from ``--weights`` (default ``$JSD_WEIGHTS`` or ``weights/``). ``serve --train`` and ``train`` do the same
for the trainer (coglet's train mode, ``POST /trainings``); ``train`` writes the LoRA .tar into ``-o DIR``.

The protocol, the schema and the server process are :mod:`jsd.coghttp`'s; this is its command line.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_inputs(pairs: list[str], schema: dict, component: str = "Input") -> dict:
    """``key=value`` strings typed by the schema's ``component``, like ``cog predict -i``; files become data URIs."""
    properties = schema["components"]["schemas"][component]["properties"]
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
        return _file_uri(key, Path(value.removeprefix("@")))
    if _takes_a_file(prop) and not remote and (value.startswith("@") or Path(value).is_file()):
        return _file_uri(key, Path(value.removeprefix("@")))
    return value


def _takes_a_file(prop: dict) -> bool:
    """A text input that also takes a file as a data URI (``lora_weights``: "an http(s) URL, data URI or path").

    A local file given to it, as ``@path`` (``cog predict``'s habit for files) or a plain path, is sent as a
    data URI: the server may run in another folder, or on another machine.
    """
    return prop.get("type") == "string" and "data URI" in prop.get("description", "")


def _file_uri(key: str, path: Path) -> str:
    from jsd.coghttp.datauri import encode_file

    if not path.is_file():
        raise SystemExit(f"-i {key}: no such file {path} (relative paths start from {Path.cwd()}).")
    return encode_file(path)


def sent_file_names(pairs: list[str], inputs: dict) -> dict[str, str]:
    """``{input: file name}`` for every ``-i key=@path`` (or path) sent as a data URI."""
    names = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if str(inputs.get(key, "")).startswith("data:") and not value.startswith("data:"):
            names[key] = Path(value.removeprefix("@")).name
    return names


def finish_job(kind: str, url: str, status: int, body: dict, write, *, names: dict[str, str] | None = None) -> int:
    """Print a prediction's or training's logs and its outcome in one sentence, write its outputs; 0 on success.

    ``kind``: "Prediction" or "Training" (the failure reads "Training failed: `input_images` …");
    ``write(output)`` writes the files and returns their paths; ``names``: the local file sent for an input,
    shown after the input's name in the error (the server only saw a data URI).
    """
    from jsd.coghttp.errors import error_text, with_file_names
    from jsd.coghttp.local import remove_job_folder

    remove_job_folder(url, body.get("id"))
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


def run_job(args, *, train: bool) -> int:
    """``predict`` or ``train``: inputs typed by the server's schema (``--url``) or the model's, one job, its files."""
    from jsd.coghttp import client, errors, local

    component = "TrainingInput" if train else "Input"
    if args.url:  # the server's own schema: no need to import the predictor here
        url = args.url.rstrip("/")
        return _job_at(url, parse_inputs(args.input, client.fetch_schema(url), component), args, train)
    schema = local.combined_schema() if train else local.openapi_schema()  # imports torch and diffusers: once
    inputs = parse_inputs(args.input, schema, component)
    log_path = REPO / ".cog" / ("coglet-train.log" if train else "coglet.log")
    log_path.parent.mkdir(exist_ok=True)
    mode = " in train mode" if train else ""
    print(f"Starting coglet{mode} (setup can take a minute; server log: {log_path})", file=sys.stderr)
    with (
        open(log_path, "wb") as log,
        local.running_server(args.weights, workdir=REPO, log=log, schema=schema, train=train) as (url, process),
    ):
        state = client.wait_for_setup(url, process, args.setup_timeout)
        if state["status"] != "READY":
            print(f"Setup failed (--weights {args.weights}): {errors.setup_error(state)}", file=sys.stderr)
            return 1
        return _job_at(url, inputs, args, train)


def _job_at(url: str, inputs: dict, args, train: bool) -> int:
    from jsd.coghttp import client, datauri

    post: Callable = client.post_training if train else client.post_prediction
    writer = datauri.write_training_output if train else datauri.write_prediction_output
    status, body = post(url, inputs)
    write = functools.partial(writer, folder=Path(args.output))
    if not train:  # the prediction's metrics (best-of-N's candidates among them) beside its images
        write = functools.partial(_with_metrics, write, body.get("metrics"), Path(args.output))
    names = sent_file_names(args.input, inputs)
    return finish_job("Training" if train else "Prediction", url, status, body, write, names=names)


METRICS_FILE = "metrics.json"


def _with_metrics(write: Callable, metrics: dict | None, folder: Path, output) -> list[Path]:
    return [*write(output), *write_metrics(metrics, folder)]


def write_metrics(metrics: dict | None, folder: Path) -> list[Path]:
    """The prediction's metrics (``predict_time``, the token counts, best-of-N's ``candidates``…) into
    ``folder/metrics.json``, beside the outputs: a candidate's ``output`` is the index in ``output.{i}.*``."""
    if not metrics:
        return []
    path = folder / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [path]


def cmd_serve(args) -> int:
    from jsd.coghttp import local

    schema = local.combined_schema() if args.train else local.openapi_schema()
    path = local.write_schema(REPO, schema)
    what = "training" if args.train else "serving"
    print(f"Wrote {path}; {what} on http://{args.host}:{args.port} with weights {args.weights}", file=sys.stderr)
    env = local.server_env(args.port, args.weights, train=args.train)
    return serve_until_interrupted(local.server_command(args.host, train=args.train), env)


def serve_until_interrupted(command: list[str], env: dict[str, str]) -> int:
    """Run the server in its own process group until it exits, or until Ctrl+C stops it: one line, no traceback.

    Ctrl+C reaches only this process (the server's group is its own), which then stops the server the way
    :func:`jsd.coghttp.local.stop_server` always does, so nothing of coglet's shutdown reaches the terminal.
    """
    import signal
    import subprocess

    from jsd.coghttp import local

    # Python keeps an inherited "ignore SIGINT" (a shell's `cmd &`, some CI runners): Ctrl+C would then do nothing.
    # Ask for it explicitly, and let SIGTERM (a service manager, `kill`) stop the server the same clean way.
    def stop(signum, _frame):
        raise KeyboardInterrupt("Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt as why:
        local.stop_server(process)
        print(f"Stopped the server ({why or 'Ctrl+C'}).", file=sys.stderr)
        return 130


def cmd_schema(args) -> int:
    from jsd.coghttp.local import build_schema

    print(json.dumps(build_schema(), indent=2, ensure_ascii=False))
    return 0


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
    predict.set_defaults(func=functools.partial(run_job, train=False))
    train = _job_parser(sub, "train", "one training (LoRA)", "the weights .tar", weights, "base checkpoint folder")
    train.set_defaults(func=functools.partial(run_job, train=True))
    sub.add_parser("schema", help="print the OpenAPI schema").set_defaults(func=cmd_schema)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
