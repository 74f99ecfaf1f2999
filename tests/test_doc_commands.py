"""Every command in README.md and docs/*.md works as written after `make demo`: the program is the venv's,
the script or make target exists, and the script's own parser accepts the documented arguments.

The rules and the parsing are in ``tests/doccommands.py``; whatever docs are added later are checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from doccommands import REPO, commands, job, problems

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHECKER = Path(__file__).with_name("doccommands.py")
# Every program a user starts from the docs; each must tell a Python without the project's packages what to run.
ENTRY_POINTS = [
    p.relative_to(REPO).as_posix()
    for folder in ("scripts", "benchmarks")
    for p in sorted((REPO / folder).glob("*.py"))
    if not p.name.startswith("_") and p.name != "bench_common.py"  # modules the scripts import
]


def run_checker(jobs: list[dict]) -> dict[str, str | None]:
    """Parse each job's arguments with the real parsers, in a fresh interpreter (the scripts' imports stay there)."""
    done = subprocess.run(
        [sys.executable, str(CHECKER)], input=json.dumps(jobs), capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checked() -> dict[str, tuple[list[str], dict]]:
    """Per doc: the problems found without running, and the argument check of each Python command."""
    per_doc, jobs = {}, []
    for doc in DOCS:
        name = doc.relative_to(REPO).as_posix()
        invocations, errors = problems(doc.read_text(encoding="utf-8"), name)
        per_doc[name] = errors
        jobs += [job(inv) for inv in invocations]
    results = run_checker(jobs)
    return {
        name: (errors, {where: error for where, error in results.items() if where.startswith(f"{name}:")})
        for name, errors in per_doc.items()
    }


def test_the_docs_hold_commands_of_every_kind():
    found = [c for doc in DOCS for c in commands(doc.read_text(encoding="utf-8"), doc.name)]
    programs = {c.words[0] for c in found}
    assert {".venv/bin/python", "make"} <= programs
    assert sum(c.words[:2] == [".venv/bin/python", "scripts/cog_local.py"] for c in found) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_documented_command_runs_as_written(checked, doc):
    errors, arguments = checked[doc.relative_to(REPO).as_posix()]
    assert errors + [f"{where}: {error}" for where, error in arguments.items() if error] == []


BROKEN_DOC = """
```bash
.venv/bin/python scripts/cog_local.py predict -i prompt=猫 --sede 42 -o outputs/   # a typo'd flag
.venv/bin/python scripts/no_such_script.py --help
python scripts/cog_local.py schema                                               # the system Python
make no-such-target
.venv/bin/python scripts/cog_local.py predict --nope …                            # placeholder: flags checked
.venv/bin/accelerate launch --no-such-launch-flag scripts/train.py
torchrun --standalone scripts/train.py
.venv/bin/python scripts/cog_local.py serve --port 5000 && curl -s localhost:5000/health-check
```
Inline: `.venv/bin/python -m jsd generate "猫" --seeed 1`.
"""


def test_the_check_finds_typos_missing_scripts_and_the_system_python():
    invocations, errors = problems(BROKEN_DOC, "broken.md")
    results = run_checker([job(inv) for inv in invocations])
    flagged = errors + [f"{where}: {error}" for where, error in results.items() if error]

    def found(needle: str, line: int) -> bool:
        return any(f"broken.md:{line}:" in text and needle in text for text in flagged)

    assert found("unrecognized arguments: --sede 42", 3)
    assert found("no script scripts/no_such_script.py", 4)
    assert found("write `.venv/bin/python`", 5)
    assert found("no make target 'no-such-target'", 6)
    assert found("unknown option(s) --nope", 7)
    assert found("accelerate rejects its arguments", 8)
    assert found("write `.venv/bin/torchrun`", 9)
    assert found("unrecognized arguments: --seeed 1", 12)
    assert not any("broken.md:10:" in text for text in flagged)  # a good command, and curl left alone
    assert len(flagged) == 8


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_a_python_without_the_packages_is_told_in_one_line_what_to_run(script):
    # -S: without site-packages, as the system Python after `make demo` (torch, cog and jsd missing); -E: nor
    # PYTHONPATH, which may point at the checkout in the shell that runs the tests (and then finds jsd)
    done = subprocess.run(
        [sys.executable, "-E", "-S", script, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, lines[-5:]
    assert f".venv/bin/python {script} --help" in lines[0] and "make venv" in lines[0], lines[0]


def test_python_dash_m_jsd_without_the_packages_says_what_to_run():
    done = subprocess.run(
        [sys.executable, "-E", "-S", "-m", "jsd", "generate", "猫"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, lines[-5:]
    assert ".venv/bin/python -m jsd generate '猫'" in lines[0] and "make venv" in lines[0], lines[0]
