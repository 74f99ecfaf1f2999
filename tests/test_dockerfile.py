"""The root Dockerfile stays what `cog build` makes from cog.yaml (no Docker needed: it reads the files).

Same Python minor version, same pins (the Dockerfile installs requirements.txt itself and reads cog's version
from cog.yaml, which must be pyproject.toml's pin), same predictor (and trainer) reference, same CUDA, and the
layout cog relies on. `make container-test` builds and serves the image for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repofiles import REPO

tomllib = pytest.importorskip("tomllib")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):  # Docker drops these inside continuations too
            continue
        if line.rstrip().endswith("\\"):
            current += line.strip()[:-1].strip() + " "
            continue
        current += line.strip()
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def cog_config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def arg_default(instructions: list[tuple[str, str]], name: str) -> str:
    for keyword, args in instructions:
        if keyword == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"the Dockerfile declares no `ARG {name}=...`")


def env_values(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
    return env


def test_parser_joins_continuations_and_skips_comments():
    text = '# c\nARG A=1\nRUN a \\\n    # a comment\n\n    b\nCMD ["x"]\n'
    assert dockerfile_instructions(text) == [("ARG", "A=1"), ("RUN", "a b"), ("CMD", '["x"]')]


def test_python_version_is_cog_yaml_s(dockerfile, cog_config):
    assert arg_default(dockerfile, "PYTHON_VERSION") == str(cog_config["build"]["python_version"])


def test_default_base_is_the_cuda_base_cog_build_picks_for_cog_yaml_s_cuda(dockerfile, cog_config):
    base = arg_default(dockerfile, "BASE_IMAGE")
    cuda = str(cog_config["build"]["cuda"])
    assert cog_config["build"]["gpu"] is True
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}\.\d+-cudnn-devel-ubuntu\d\d\.\d\d", base), base


def test_predictor_and_trainer_references_are_cog_yaml_s(dockerfile, cog_config):
    env = env_values(final_stage(dockerfile))
    assert env.get("COG_PREDICT_TYPE_STUB") == cog_config.get("run", cog_config.get("predict"))
    # cog build sets COG_TRAIN_TYPE_STUB exactly when cog.yaml has `train:` (cogEnvVars).
    assert env.get("COG_TRAIN_TYPE_STUB") == cog_config.get("train"), (
        "cog.yaml `train:` and the Dockerfile's ENV COG_TRAIN_TYPE_STUB must match (both absent, or equal)"
    )


def test_packages_come_from_requirements_txt_and_no_pin_is_repeated(dockerfile, cog_config):
    text = (REPO / "Dockerfile").read_text()
    assert cog_config["build"]["python_requirements"] == "requirements.txt"
    runs = " ".join(args for keyword, args in dockerfile if keyword == "RUN")
    assert "source=requirements.txt" in runs and 'pip install "$@" -r /tmp/requirements.txt' in runs
    # Versions live in requirements.txt and cog.yaml only: a pin written here would drift.
    assert not re.findall(r"\b[A-Za-z][\w.-]*==\d", text)


def run_instructions(instructions: list[tuple[str, str]]) -> str:
    """Every RUN instruction's command, comments left out (what Docker runs)."""
    return "\n".join(args for keyword, args in instructions if keyword == "RUN")


def test_cog_version_read_from_cog_yaml_is_pyproject_s_pin(dockerfile, cog_config):
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    pin = next(p.split("==", 1)[1] for p in serve if p.startswith("cog=="))
    assert str(cog_config["build"]["sdk_version"]) == pin
    # The Dockerfile and scripts/container_test.sh extract it with one sed expression: run it.
    found = re.search(r"sed -n '([^']+)' /tmp/jsd/cog\.yaml", run_instructions(dockerfile))
    assert found, "no RUN instruction reads cog's version from cog.yaml"
    expression = found.group(1)
    assert f"sed -n '{expression}' cog.yaml" in (REPO / "scripts" / "container_test.sh").read_text()
    found = subprocess.run(["sed", "-n", expression, "cog.yaml"], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == pin


def test_image_layout_is_cog_s(dockerfile):
    final = final_stage(dockerfile)
    keywords = [keyword for keyword, _ in final]
    args = dict(reversed(final))  # the first value of each instruction
    assert ("CMD", '["python", "-m", "cog.server.http"]') in final
    assert args["WORKDIR"] == "/src" and args["EXPOSE"] == "5000"
    assert "USER" not in [keyword for keyword, _ in dockerfile]  # root, as cog build
    entrypoint = json.loads(next(a for k, a in dockerfile if k == "ENTRYPOINT"))
    assert entrypoint[0].endswith("/tini") and entrypoint[-1] == "--"
    # Weights in their own layer below the code (cog build --separate-weights).
    copies = [a for k, a in final if k == "COPY"]
    assert copies[0].endswith("/src/weights") and copies[-1].endswith(" /src")
    assert keywords.index("CMD") < len(keywords) - 1  # the code comes last, after CMD, as in cog's Dockerfile


# The RUN that bakes the schema: `cd /src; [VAR=value ...] python scripts/cog_local.py schema > PATH;`.
SCHEMA_COMMAND = re.compile(r"cd (/\S+); ((?:\w+=\S+ )*)python (scripts/cog_local\.py schema) > ([^\s;]+)")


def schema_command(instructions: list[tuple[str, str]]) -> re.Match:
    found = SCHEMA_COMMAND.search(run_instructions(instructions))
    assert found, "no RUN instruction bakes the schema with `python scripts/cog_local.py schema > ...`"
    return found


def test_schema_is_baked_where_coglet_reads_it_with_cog_local(dockerfile):
    from jsd.coghttp.local import SCHEMA_PATH

    assert schema_command(dockerfile).group(4) == str(SCHEMA_PATH)
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "!scripts/cog_local.py" in dockerignore  # in the build context, removed from the image


def build_context(destination: Path) -> Path:
    """The code files of the Docker build context: .dockerignore's allow-list (`*`, then `!PATH` lines),
    less weights/ and .cog/ (the image gets those another way)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore is no longer an allow-list: update build_context"
    for entry in (line[1:].rstrip("/") for line in lines if line.startswith("!")):
        source = REPO / entry
        if entry in ("weights", ".cog") or not source.exists():
            continue
        target = destination / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    return destination


def test_the_baked_schema_serves_predictions_and_the_trainer(dockerfile, cog_config, tmp_path):
    """The Dockerfile's own schema command, run on the build context's files: the schema holds cog.yaml's
    trainer (Replicate starts the same image with --x-mode train), not only the predictor."""
    found = schema_command(dockerfile)
    workdir, env_prefix, command = found.group(1), found.group(2), found.group(3).split()
    context = build_context(tmp_path / workdir.strip("/"))
    env = {key: value.replace(workdir, str(context)) for key, value in re.findall(r"(\w+)=(\S+)", env_prefix)}
    result = subprocess.run(
        [sys.executable, *command], cwd=context, env=os.environ | env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    schema = json.loads(result.stdout)
    assert cog_config.get("train"), "cog.yaml has no train: (the image would serve no trainings)"
    schemas = schema["components"]["schemas"]
    assert {"Input", "Output", "TrainingInput", "TrainingOutput"} <= set(schemas), sorted(schemas)
    assert {"/predictions", "/trainings"} <= set(schema["paths"]), sorted(schema["paths"])
    assert {"input_images", "lora_rank"} <= set(schemas["TrainingInput"]["properties"])
    assert {"prompt", "negative_prompt"} <= set(schemas["Input"]["properties"])
