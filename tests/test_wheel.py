"""The built wheel works outside the checkout: nothing in ``jsd`` reaches into ``scripts/`` or ``tests/``.

``python -m jsd playground --help`` and a prediction through :mod:`jsd.coghttp.client` run from the wheel.

The wheel is built from a copy of the package's files and installed (``--no-deps``) into a fresh venv in a
temporary folder; its dependencies come from this venv's site-packages by a ``.pth`` line (a plain path: the
editable install of this checkout is not activated there). Every command runs in another temporary folder.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from repofiles import REPO

from jsd.coghttp.fake import FakeCogServer


def _run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's python, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "jsd", source / "jsd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp / "dist")], tmp)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("jsd-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    )
    (target / "_jsd_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return python, work


def test_the_installed_package_is_the_wheels(installed):
    python, work = installed
    done = _run([str(python), "-c", "import jsd.playground.cog_api, jsd; print(jsd.__file__)"], work)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).is_relative_to(python.parents[1]), done.stdout  # not the checkout's


def test_python_m_jsd_playground_help_works_outside_the_checkout(installed):
    python, work = installed
    done = _run([str(python), "-m", "jsd", "playground", "--help"], work)
    assert done.returncode == 0 and "--api" in done.stdout, done.stderr[-2000:]


def test_a_prediction_through_the_installed_client(installed):
    python, work = installed

    def answer(request):
        return 200, {"status": "succeeded", "output": ["data:image/png;base64,iVBO"], "input": request.body["input"]}

    code = "import json, sys; from jsd.coghttp import client; "
    code += "print(json.dumps(client.post_prediction(sys.argv[1], {'prompt': '猫'})))"
    with FakeCogServer(answer) as fake:
        done = _run([str(python), "-c", code, fake.url], work)
    assert done.returncode == 0, done.stderr[-2000:]
    status, body = json.loads(done.stdout)
    assert status == 200 and body["input"] == {"prompt": "猫"} and fake.requests[0].path == "/predictions"
