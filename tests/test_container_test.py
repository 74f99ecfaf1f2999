"""scripts/container_test.sh picks a docker client that can build the Dockerfile with BuildKit (no Docker needed).

A machine of the kind CI runs on ships Docker 28's client at /usr/local/bin/docker without the buildx plugin and
no engine: `DOCKER_BUILDKIT=1 docker build` with that client stops at once ("BuildKit is enabled but the buildx
component is missing or broken"). These tests run the script's choice (``--pick-docker``) and its first step
(engine install, daemon start) against stub ``docker`` executables, with no real docker on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from repofiles import REPO

SCRIPT = REPO / "scripts" / "container_test.sh"
BASH = shutil.which("bash")
# Commands the script may not find on the host: the tests give their own (stubs) or none at all.
HIDDEN = {"docker", "dockerd", "apt-get", "dpkg", "id"}

# A stub client: answers --version and `buildx version` as the real ones do, `info` while a daemon "runs"
# (the file named by $STUB_DAEMON exists), logs every call to $STUB_CALLS, and fails anything else.
CLIENT = """#!/bin/sh
echo "$0 $*" >> "$STUB_CALLS"
case "$1" in
    --version) echo "Docker version {version}, build 0000000" ;;
    buildx) {buildx} ;;
    info) [ -f "$STUB_DAEMON" ] ;;
    *) exit 1 ;;
esac
"""
WITH_BUILDX = "echo 'github.com/docker/buildx v0.23.0 28c90ea'"
WITHOUT_BUILDX = "echo 'docker: unknown command: docker buildx' >&2; exit 1"


def client(folder: Path, version: str, buildx: bool) -> Path:
    """A stub docker client at folder/docker."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docker"
    path.write_text(CLIENT.format(version=version, buildx=WITH_BUILDX if buildx else WITHOUT_BUILDX))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def system_bin(tmp_path_factory) -> Path:
    """The host's /usr/bin and /usr/sbin, less any docker, dockerd, apt-get, dpkg and id."""
    folder = tmp_path_factory.mktemp("system-bin")
    for source in (Path("/usr/sbin"), Path("/usr/bin"), Path("/sbin"), Path("/bin")):
        if not source.is_dir():
            continue
        for entry in source.iterdir():
            if entry.name not in HIDDEN and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def run(tmp_path: Path, system_bin: Path, path: list[Path], *args: str, **env: str) -> subprocess.CompletedProcess:
    """The script with PATH = path + the host's tools (no docker among them)."""
    environment = {
        "PATH": os.pathsep.join([*map(str, path), str(system_bin)]),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "STUB_CALLS": str(tmp_path / "calls.log"),
        "STUB_DAEMON": str(tmp_path / "daemon-running"),
        **env,
    }
    return subprocess.run([BASH, str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=60)


def pick(tmp_path, system_bin, path, engine: Path, **env) -> subprocess.CompletedProcess:
    return run(tmp_path, system_bin, path, "--pick-docker", JSD_ENGINE_DOCKER=str(engine), **env)


def test_engine_client_wins_over_a_docker_28_without_buildx_first_on_path(tmp_path, system_bin):
    docker28 = client(tmp_path / "local-bin", "28.2.2", buildx=False)
    engine = client(tmp_path / "usr-bin", "20.10.24+dfsg1", buildx=False)  # Debian's docker.io
    found = pick(tmp_path, system_bin, [docker28.parent, engine.parent], engine)
    assert (found.returncode, found.stdout.strip()) == (0, str(engine)), found.stderr


def test_docker_28_without_buildx_is_never_chosen_when_there_is_no_engine_client(tmp_path, system_bin):
    docker28 = client(tmp_path / "local-bin", "28.2.2", buildx=False)
    found = pick(tmp_path, system_bin, [docker28.parent], tmp_path / "no-engine" / "docker")
    assert found.returncode == 1 and found.stdout == ""
    assert "buildx" in found.stderr and str(docker28) in found.stderr  # says what it tried and what is missing


def test_a_client_with_buildx_further_on_path_is_chosen(tmp_path, system_bin):
    docker28 = client(tmp_path / "local-bin", "28.2.2", buildx=False)
    with_buildx = client(tmp_path / "opt-bin", "28.2.2", buildx=True)
    found = pick(tmp_path, system_bin, [docker28.parent, with_buildx.parent], tmp_path / "no-engine" / "docker")
    assert (found.returncode, found.stdout.strip()) == (0, str(with_buildx)), found.stderr


def test_an_engine_client_of_docker_23_or_later_without_buildx_is_skipped(tmp_path, system_bin):
    engine = client(tmp_path / "usr-bin", "26.1.5+dfsg1", buildx=False)  # e.g. Debian trixie's docker.io alone
    older = client(tmp_path / "local-bin", "20.10.24+dfsg1", buildx=False)
    found = pick(tmp_path, system_bin, [older.parent], engine)
    assert (found.returncode, found.stdout.strip()) == (0, str(older)), found.stderr


def test_docker_variable_is_used_alone_and_refused_when_it_cannot_build(tmp_path, system_bin):
    docker28 = client(tmp_path / "local-bin", "28.2.2", buildx=False)
    engine = client(tmp_path / "usr-bin", "20.10.24+dfsg1", buildx=False)
    refused = pick(tmp_path, system_bin, [engine.parent], engine, DOCKER=str(docker28))
    assert refused.returncode == 1 and refused.stdout == "" and "unset DOCKER" in refused.stderr
    with_buildx = client(tmp_path / "opt-bin", "28.2.2", buildx=True)
    found = pick(tmp_path, system_bin, [engine.parent], engine, DOCKER=str(with_buildx))
    assert (found.returncode, found.stdout.strip()) == (0, str(with_buildx)), found.stderr


def test_on_a_bare_machine_the_client_is_chosen_after_docker_io_is_installed(tmp_path, system_bin):
    """Only Docker 28 without buildx and no engine: the script installs docker.io (stub apt-get), starts
    dockerd (stub) and then talks to it with the engine's client, never with the one it found first."""
    docker28 = client(tmp_path / "local-bin", "28.2.2", buildx=False)
    engine = tmp_path / "usr-bin" / "docker"  # appears when "docker.io" is installed
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "id").write_text("#!/bin/sh\necho 0\n")
    (stubs / "dpkg").write_text("#!/bin/sh\nexit 0\n")
    engine_client = CLIENT.format(version="20.10.24+dfsg1", buildx=WITHOUT_BUILDX)
    dockerd = '#!/bin/sh\ntouch "$STUB_DAEMON"\nexec sleep 60\n'
    (stubs / "apt-get").write_text(
        "#!/bin/sh\n"
        'case "$*" in *"install"*docker.io*) ;; *) exit 0 ;; esac\n'
        f"mkdir -p {engine.parent}\ncat > {engine} <<'EOF'\n{engine_client}EOF\nchmod +x {engine}\n"
        f"cat > {sbin / 'dockerd'} <<'EOF'\n{dockerd}EOF\nchmod +x {sbin / 'dockerd'}\n"
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    result = run(
        tmp_path,
        system_bin,
        [stubs, docker28.parent, sbin],
        PYTHON=shutil.which("true", path=str(system_bin)),
        JSD_ENGINE_DOCKER=str(engine),
        JSD_CONTAINER_CACHE=str(tmp_path / "cache"),
    )
    calls = [call.split(" ", 2)[:2] for call in (tmp_path / "calls.log").read_text().splitlines()]
    assert "installing docker.io" in result.stderr and "starting dockerd" in result.stderr, result.stderr
    assert "stopping the dockerd this script started" in result.stderr, result.stderr
    # Once the daemon runs, the first thing asked of it (the leftover containers: `ps`, which the stub refuses,
    # so the script stops there) goes through the engine's client; Docker 28 is only ever asked what it is.
    assert [str(engine), "ps"] in calls, calls
    assert {command for path, command in calls if path == str(docker28)} <= {"--version", "buildx", "info"}, calls


APT_INSTALL = REPO / "scripts" / "apt_install.sh"
# dpkg and apt-get as they behave after an install was killed half-way: apt-get refuses while the marker file
# ($STUB_INTERRUPTED, dpkg's pending updates) is there; `dpkg --configure -a` clears it. Both log their calls.
STUB_DPKG = """#!/bin/sh
echo "dpkg $*" >> "$STUB_CALLS"
[ "$*" = "--configure -a" ] && rm -f "$STUB_INTERRUPTED"
exit 0
"""
STUB_APT_GET = """#!/bin/sh
if [ -f "$STUB_INTERRUPTED" ]; then
    echo "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem." >&2
    exit 100
fi
echo "apt-get $*" >> "$STUB_CALLS"
"""


def apt_install(tmp_path: Path, system_bin: Path, uid: int, *packages: str) -> subprocess.CompletedProcess:
    """scripts/apt_install.sh with stub id (uid), dpkg and apt-get, on a machine whose last install was cut off."""
    stubs = tmp_path / "apt-stubs"
    stubs.mkdir()
    for name, text in {"id": f"#!/bin/sh\necho {uid}\n", "dpkg": STUB_DPKG, "apt-get": STUB_APT_GET}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "interrupted").touch()
    environment = {
        "PATH": os.pathsep.join([str(stubs), str(system_bin)]),
        "STUB_CALLS": str(tmp_path / "calls.log"),
        "STUB_INTERRUPTED": str(tmp_path / "interrupted"),
    }
    return subprocess.run([BASH, str(APT_INSTALL), *packages], env=environment, capture_output=True, text=True)


def test_an_install_cut_off_earlier_is_finished_before_the_packages_are_installed(tmp_path, system_bin):
    """A CI machine whose previous job was killed mid-`apt-get install` still installs Chromium (it used to stop
    with "dpkg was interrupted")."""
    result = apt_install(tmp_path, system_bin, 0, "chromium", "fonts-ipafont-gothic")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "dpkg --configure -a",
        "apt-get update -q",
        "apt-get install -y -q chromium fonts-ipafont-gothic",
    ]


def test_installing_without_root_names_the_packages_and_runs_nothing(tmp_path, system_bin):
    result = apt_install(tmp_path, system_bin, 1000, "chromium", "fonts-ipafont-gothic")
    assert result.returncode == 1
    assert "chromium fonts-ipafont-gothic" in result.stderr and "root" in result.stderr, result.stderr
    assert not (tmp_path / "calls.log").exists()
