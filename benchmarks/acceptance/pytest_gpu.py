"""``pytest -m gpu``: tests/test_gpu.py on the generated weights, counted from pytest's JUnit XML; on a GPU none
may skip."""

from __future__ import annotations

import os
import subprocess
import sys

from acceptance.context import Context, last_line
from acceptance.plan import REPO
from acceptance.runner import Step, StepResult


def step_pytest_gpu(ctx: Context, result: StepResult) -> None:
    """tests/test_gpu.py on the generated weights (``JSD_WEIGHTS``), counted from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    junit = ctx.workdir / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    env = os.environ | {"JSD_WEIGHTS": str(ctx.weights())}
    done = subprocess.run([*cmd, f"--junitxml={junit}"], cwd=REPO, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result.figures |= counts | {"exit_status": done.returncode}
    result.check("pytest exit status 0", done.returncode == 0, last_line(done.stdout))
    if ctx.cuda:
        result.check("every gpu test ran (none skipped)", counts["tests"] > 0 and counts["skipped"] == 0)
    else:
        result.check(
            "gpu tests ran", None, f"n/a on CPU: collected {counts['tests']}, all skip without CUDA (as designed)"
        )


STEP = Step("pytest-gpu", "pytest -m gpu", step_pytest_gpu)
