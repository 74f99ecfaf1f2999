"""scripts/download_weights.py against a fake hub, and scripts/push.sh with fake `make` and `cog`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from repofiles import REPO, load_repo_module

from jsd.manifest import verify_manifest
from jsd.tiny import write_2022_checkpoint

REPO_ID = "rinna/japanese-stable-diffusion"
SHA = "f0e1d2c3b4a5968778695a4b3c2d1e0f12345678"


download_weights = load_repo_module("scripts/download_weights.py")


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory, tiny_checkpoint) -> Path:
    """What the hub repo holds: rinna's 2022 layout plus files serving does not need."""
    repo = write_2022_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("hub") / "repo")
    (repo / "README.md").write_text("# Japanese Stable Diffusion")
    (repo / "japanese-stable-diffusion.ckpt").write_bytes(b"a 4 GB original-format checkpoint")
    shutil.copyfile(repo / "unet" / "diffusion_pytorch_model.bin", repo / "unet" / "diffusion_pytorch_model.fp16.bin")
    return repo


class FakeHub:
    """Stands in for huggingface_hub's model_info and snapshot_download (which copies what is allowed)."""

    def __init__(self, repo: Path, cache: Path, error: Exception | None = None):
        self.repo, self.cache, self.error = repo, cache, error
        self.info_calls, self.downloads = [], []

    def model_info(self, repo_id, *, revision=None, token=None):
        self.info_calls.append((repo_id, revision, token))
        if self.error is not None:
            raise self.error
        names = [p.relative_to(self.repo).as_posix() for p in self.repo.rglob("*") if p.is_file()]
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=n) for n in names])

    def snapshot_download(self, repo_id, *, revision, allow_patterns, token, cache_dir):
        self.downloads.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        snapshot = self.cache / "snapshots" / revision
        for name in allow_patterns:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.repo / name, snapshot / name)
        return str(snapshot)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, hub_files):
    def install(error: Exception | None = None, token: str | None = "hf_test") -> FakeHub:
        hub = FakeHub(hub_files, tmp_path / "cache", error)
        monkeypatch.setattr("huggingface_hub.HfApi.model_info", hub.model_info)
        monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: token)
        return hub

    return install


def test_hub_download_fetches_only_what_serving_needs_pinned_to_the_commit(fake_hub, tmp_path, capsys):
    hub = fake_hub()
    dest = tmp_path / "weights"
    assert download_weights.main(["--dest", str(dest)]) == 0
    (download,) = hub.downloads
    assert download["repo_id"] == REPO_ID and download["revision"] == SHA
    fetched = set(download["allow_patterns"])
    assert {"unet/diffusion_pytorch_model.bin", "tokenizer/spiece.model", "scheduler/scheduler_config.json"} <= fetched
    assert not fetched & {"README.md", "japanese-stable-diffusion.ckpt", "unet/diffusion_pytorch_model.fp16.bin"}
    manifest = verify_manifest(dest)
    assert (manifest["source"], manifest["revision"]) == (REPO_ID, SHA)
    assert hub.info_calls == [(REPO_ID, None, "hf_test")]
    # A rerun on the complete folder says so and does not even ask the hub.
    capsys.readouterr()
    assert download_weights.main(["--dest", str(dest)]) == 0
    assert "already complete and verified; nothing to do" in capsys.readouterr().out
    assert len(hub.info_calls) == 1
    # A branch name is resolved to its commit first: the same commit is still a no-op.
    assert download_weights.main(["--dest", str(dest), "--revision", "main"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert hub.info_calls[-1] == (REPO_ID, "main", "hf_test")


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}"))


@pytest.mark.parametrize(
    ("error", "token", "note"),
    [
        (GatedRepoError("gated", response=_response(403)), "hf_test", "A token was sent"),
        (RepositoryNotFoundError("not found", response=_response(401)), None, "No token was found"),
        (HfHubHTTPError("forbidden", response=_response(403)), "hf_test", "has not accepted the license"),
    ],
)
def test_refused_access_explains_the_gated_license_step(fake_hub, tmp_path, capsys, error, token, note):
    fake_hub(error=error, token=token)
    assert download_weights.main(["--dest", str(tmp_path / "weights")]) == 1
    err = capsys.readouterr().err
    assert f"accept the license on https://huggingface.co/{REPO_ID}" in err
    assert "CreativeML OpenRAIL-M" in err and "export HF_TOKEN=" in err and note in err
    assert not (tmp_path / "weights").exists()


def test_local_source_then_verify_only_names_a_corrupt_file_and_refuses_tiny(
    hub_files, tiny_checkpoint, tmp_path, capsys
):
    dest = tmp_path / "weights"
    assert download_weights.main(["--source", str(hub_files), "--dest", str(dest)]) == 0
    assert verify_manifest(dest)["source"] == str(hub_files.resolve())
    assert download_weights.main(["--verify-only", str(dest)]) == 0
    assert f"verified {dest}: {hub_files.resolve()}@local, 14 files" in capsys.readouterr().out
    unet = dest / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-10])
    assert download_weights.main(["--verify-only", str(dest)]) == 1
    err = capsys.readouterr().err
    assert f"error: {unet} has" in err and "truncated" in err
    assert download_weights.main(["--verify-only", str(tiny_checkpoint)]) == 1
    assert "tiny test checkpoint" in capsys.readouterr().err
    assert download_weights.main(["--verify-only", str(tiny_checkpoint), "--allow-tiny"]) == 0


# --------------------------------------------------------------------------- scripts/push.sh


@pytest.fixture
def fake_tools(tmp_path) -> tuple[dict, Path]:
    """`make` and `cog` on PATH that only record their arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("make", "cog"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        script.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    env.pop("JSD_WEIGHTS", None)
    return env, log


@pytest.fixture
def push_repo(tmp_path) -> Path:
    """A project root holding only push.sh and the script it runs: its weights/ is the test's."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("push.sh", "download_weights.py"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    return root


def _push(*args: str, env: dict, root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(root / "scripts" / "push.sh"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_dry_run_prints_the_three_commands_and_runs_none(fake_tools):
    env, log = fake_tools
    for weights in (None, "weights", "weights/", f"{REPO}/weights"):
        result = _push("--dry-run", "r8.im/alice/japanese-sd", env=env | ({"JSD_WEIGHTS": weights} if weights else {}))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"{sys.executable} scripts/download_weights.py --verify-only weights",
            "make test",
            "cog push --separate-weights r8.im/alice/japanese-sd",
        ]
    assert not log.exists()


def test_push_rejects_a_model_name_that_is_not_on_replicate(fake_tools):
    env, _log = fake_tools
    result = _push("--dry-run", "alice/japanese-sd", env=env)
    assert result.returncode == 2 and "r8.im/OWNER/MODEL" in result.stderr and "alice/japanese-sd" in result.stderr


@pytest.mark.parametrize("weights", ["out/stage2", "/tmp/weights", "weights-v2"])
def test_push_refuses_a_jsd_weights_folder_the_image_does_not_serve(fake_tools, weights):
    # The image serves weights/ (cog.yaml sets no JSD_WEIGHTS): verifying another folder proves nothing.
    env, log = fake_tools
    result = _push("--dry-run", "r8.im/alice/japanese-sd", env=env | {"JSD_WEIGHTS": weights})
    assert result.returncode == 2
    assert f"JSD_WEIGHTS is '{weights}', but the image serves weights/ only" in result.stderr
    assert result.stdout == "" and not log.exists()


def test_push_refuses_the_leftovers_of_an_interrupted_conversion(fake_tools, push_repo):
    env, log = fake_tools
    (push_repo / ".weights.staging" / "unet").mkdir(parents=True)
    result = _push("--dry-run", "r8.im/alice/japanese-sd", env=env, root=push_repo)
    assert result.returncode == 1 and ".weights.staging is left from an interrupted" in result.stderr
    assert result.stdout == "" and not log.exists()


def test_push_verifies_then_tests_then_pushes_and_stops_at_bad_weights(fake_tools, tiny_checkpoint, push_repo):
    env, log = fake_tools
    weights = shutil.copytree(tiny_checkpoint, push_repo / "weights")
    result = _push("--allow-tiny", "r8.im/alice/japanese-sd", env=env, root=push_repo)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["make test", "cog push --separate-weights r8.im/alice/japanese-sd"]
    log.unlink()
    # Without --allow-tiny (an empty option list) a tiny checkpoint is refused.
    result = _push("r8.im/alice/japanese-sd", env=env, root=push_repo)
    assert result.returncode == 1 and "weights holds a tiny test checkpoint" in result.stderr
    assert not log.exists()
    vae = weights / "vae" / "config.json"
    vae.write_text(json.dumps({"tampered": True}))
    result = _push("--allow-tiny", "r8.im/alice/japanese-sd", env=env, root=push_repo)
    assert result.returncode == 1 and "weights/vae/config.json has" in result.stderr
    assert not log.exists()


def test_push_expands_arrays_so_that_bash_3_2_accepts_an_empty_one():
    # macOS' bash 3.2 with `set -u` aborts on "${empty[@]}"; ${a[@]+"${a[@]}"} expands to nothing instead.
    script = (REPO / "scripts" / "push.sh").read_text()
    assert not re.findall(r'(?<!\+)"\$\{\w+\[@\]\}"', script)


# --------------------------------------------------------------------------- .dockerignore


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker compiles it: `*` within one name, `**/` any folders (or none)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2 + pattern.startswith("/", i + 2)
            out += ".*" if i >= len(pattern) else "(.*/)?"
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def _in_docker_context(path: str, dockerignore: str) -> bool:
    """Whether Docker sends ``path``: the last rule matching it or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rule = _docker_pattern(line.removeprefix("!").strip("/"))
        if any(rule.match(c) for c in candidates):
            sent = keep
    return sent


def test_dockerignore_lets_in_only_what_the_image_serves():
    dockerignore = (REPO / ".dockerignore").read_text()
    sent = [
        "predict.py",
        "cog.yaml",
        "requirements.txt",
        "jsd/serving.py",
        "jsd/training/trainer.py",
        "jsd/data/corpus_ja.txt",
        "weights/manifest.json",
        "weights/unet/diffusion_pytorch_model.safetensors",
        ".cog/openapi_schema.json",
        ".cog/tmp/build20260101/cog-0.16.0-py3-none-any.whl",
        "train.py",  # cog.yaml `train:`
        "scripts/cog_local.py",  # the root Dockerfile writes the schema with it (and leaves it out of the image)
    ]
    kept_out = [
        "tests/test_predict.py",
        "scripts/train.py",
        "scripts/push.sh",
        "README.md",
        "out/stage2/checkpoint-500/optimizer.bin",
        "runs/stage1/checkpoint-1000/model.safetensors",
        "data/train/00001.jpg",
        "outputs/out-0.webp",
        "my-finetune/unet/diffusion_pytorch_model.safetensors",
        ".weights.staging/unet/diffusion_pytorch_model.safetensors",
        ".weights.old/manifest.json",
        "weights.partial/unet/diffusion_pytorch_model.safetensors",
        "weights/.stamp.json",
        "jsd/__pycache__/serving.cpython-311.pyc",
        "jsd/training/__pycache__/trainer.cpython-311.pyc",
        ".cog/coglet.log",
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
    ]
    assert [p for p in sent if not _in_docker_context(p, dockerignore)] == []
    assert [p for p in kept_out if _in_docker_context(p, dockerignore)] == []


# ---- --scorer: rinna's Japanese CLIP / CLOOB --------------------------------------------------------------------
SCORER_REPO, TOKENIZER_REPO = "rinna/japanese-clip-vit-b-16", "rinna/japanese-roberta-base"


@pytest.fixture(scope="module")
def scorer_hub(tmp_path_factory) -> dict[str, Path]:
    """The two hub repos --scorer reads: rinna's CLIP (config.json + pickle) and japanese-roberta-base's tokenizer."""
    from jsd.tiny import write_tiny_scorer

    root = tmp_path_factory.mktemp("scorer-hub")
    clip = write_tiny_scorer(root / "clip", kind="clip", seed=3, layout="hub")
    roberta = Path(shutil.move(clip / "tokenizer", root / "roberta"))
    (roberta / "pytorch_model.bin").write_bytes(b"the RoBERTa model, not needed")
    (clip / "README.md").write_text("# Japanese CLIP")
    return {SCORER_REPO: clip, TOKENIZER_REPO: roberta}


@pytest.fixture
def fake_scorer_hub(monkeypatch, tmp_path, scorer_hub):
    hubs = {repo: FakeHub(folder, tmp_path / "cache" / repo) for repo, folder in scorer_hub.items()}
    downloads = []

    def model_info(_api, repo_id, *, revision=None, token=None):  # patched onto HfApi: called as a method
        return hubs[repo_id].model_info(repo_id, revision=revision, token=token)

    def snapshot_download(repo_id, **kwargs):
        downloads.append({"repo_id": repo_id, **kwargs})
        return hubs[repo_id].snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    return downloads


def test_scorer_download_converts_rinnas_pickle_to_safetensors_with_a_manifest(fake_scorer_hub, tmp_path, capsys):
    import torch
    from PIL import Image

    from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer
    from jsd.tiny import write_tiny_scorer

    dest = tmp_path / "weights"
    assert download_weights.main(["--dest", str(dest), "--scorer", SCORER_REPO]) == 0
    assert [(d["repo_id"], d["revision"], sorted(d["allow_patterns"])) for d in fake_scorer_hub] == [
        (SCORER_REPO, SHA, ["config.json", "pytorch_model.bin"]),
        (TOKENIZER_REPO, SHA, ["special_tokens_map.json", "spiece.model", "tokenizer_config.json"]),
    ]
    folder = dest / SCORER_FOLDER
    manifest = verify_manifest(folder)
    assert (manifest["source"], manifest["revision"]) == (SCORER_REPO, SHA)
    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "tokenizer/special_tokens_map.json",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer_config.json",
    ]
    assert f"wrote {folder}: {SCORER_REPO}@{SHA}" in capsys.readouterr().out
    # The converted (fp16) scorer computes the features of the same weights loaded in fp32.
    reference = write_tiny_scorer(tmp_path / "reference", kind="clip", seed=3)
    image = [Image.new("RGB", (240, 200), (200, 30, 60))]
    converted = JapaneseCLIPScorer.from_pretrained(folder)
    torch.testing.assert_close(
        converted.image_features(image),
        JapaneseCLIPScorer.from_pretrained(reference).image_features(image),
        atol=2e-3,
        rtol=0,
    )
    assert download_weights.main(["--dest", str(dest), "--scorer", SCORER_REPO]) == 0  # rerun: no network
    assert len(fake_scorer_hub) == 2 and "already complete and verified" in capsys.readouterr().out


def test_scorer_from_a_local_folder_and_a_bad_one(scorer_hub, tmp_path, capsys):
    from jsd.japanese_clip import SCORER_FOLDER

    local = Path(shutil.copytree(scorer_hub[SCORER_REPO], tmp_path / "clip"))
    shutil.copytree(scorer_hub[TOKENIZER_REPO], local / "tokenizer")
    assert download_weights.main(["--dest", str(tmp_path / "w"), "--scorer", str(local)]) == 0
    verify_manifest(tmp_path / "w" / SCORER_FOLDER)

    config = json.loads((local / "config.json").read_text())
    config["projection_dim"] = 7
    (local / "config.json").write_text(json.dumps(config))
    assert download_weights.main(["--dest", str(tmp_path / "bad"), "--scorer", str(local)]) == 1
    assert "pytorch_model.bin does not fit config.json" in capsys.readouterr().err
    assert not (tmp_path / "bad" / SCORER_FOLDER).exists()


def test_a_local_scorer_retrained_in_place_is_not_taken_for_the_one_converted_before(scorer_hub, tmp_path, capsys):
    """The same folder converted again: a no-op while its weights are the same; once they changed (a scorer
    retrained at the same path), the old conversion is not silently kept."""
    import torch

    from jsd.japanese_clip import HUB_WEIGHTS_FILE, SCORER_FOLDER

    local = Path(shutil.copytree(scorer_hub[SCORER_REPO], tmp_path / "clip"))
    shutil.copytree(scorer_hub[TOKENIZER_REPO], local / "tokenizer")
    dest = tmp_path / "w"
    assert download_weights.main(["--dest", str(dest), "--scorer", str(local)]) == 0
    assert download_weights.main(["--dest", str(dest), "--scorer", str(local)]) == 0
    assert "already complete" in capsys.readouterr().out
    state = torch.load(local / HUB_WEIGHTS_FILE, weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, local / HUB_WEIGHTS_FILE)
    before = (dest / SCORER_FOLDER / "manifest.json").read_text()
    assert download_weights.main(["--dest", str(dest), "--scorer", str(local)]) == 1
    assert "--force" in capsys.readouterr().err  # refused, naming the way to replace it
    assert (dest / SCORER_FOLDER / "manifest.json").read_text() == before
    assert download_weights.main(["--dest", str(dest), "--scorer", str(local), "--force"]) == 0
    assert (dest / SCORER_FOLDER / "manifest.json").read_text() != before
    verify_manifest(dest / SCORER_FOLDER)


def test_replacing_the_weights_keeps_the_scorer_beside_them(hub_files, tiny_scorer, tmp_path):
    from jsd.japanese_clip import SCORER_FOLDER

    dest = tmp_path / "weights"
    assert download_weights.main(["--source", str(hub_files), "--dest", str(dest)]) == 0
    shutil.copytree(tiny_scorer, dest / SCORER_FOLDER)
    verify_manifest(dest)  # the main manifest neither lists nor refuses the scorer's files
    assert download_weights.main(["--source", str(hub_files), "--dest", str(dest), "--force"]) == 0
    assert not any(name.startswith(SCORER_FOLDER) for name in verify_manifest(dest)["files"])
    assert verify_manifest(dest / SCORER_FOLDER)["source"].startswith("jsd.tiny scorer=clip")


def test_scorer_tokenizer_from_a_local_folder(scorer_hub, tmp_path, capsys):
    from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer

    dest = tmp_path / "w"
    argv = ["--dest", str(dest), "--scorer", str(scorer_hub[SCORER_REPO])]
    assert download_weights.main([*argv, "--scorer-tokenizer", str(tmp_path / "none")]) == 1
    assert f"--scorer-tokenizer '{tmp_path / 'none'}' holds no spiece.model" in capsys.readouterr().err
    assert download_weights.main([*argv, "--scorer-tokenizer", str(scorer_hub[TOKENIZER_REPO])]) == 0
    tokenizer = JapaneseCLIPScorer.from_pretrained(dest / SCORER_FOLDER).tokenizer
    assert Path(tokenizer.vocab_file).read_bytes() == (scorer_hub[TOKENIZER_REPO] / "spiece.model").read_bytes()
