"""What a user sees and keeps after using the servers: only lines we wrote in the logs, no files left behind.

Each server runs with a private TMPDIR (files of other processes on this machine cannot interfere) and
its own LoRA cache; once it has stopped, that folder must be empty. A log line is ours when it matches one
of the patterns below; anything else — an upstream notice, a stray warning — fails the test. The client's
errors (``scripts/cog_local.py``) are checked against the same servers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from cogserver import cog_local, cog_server
from loopback import LoopbackFiles
from PIL import Image
from repofiles import REPO

from jsd.coghttp.errors import clean_error

pytestmark = pytest.mark.slow
FAST = {"width": 128, "height": 128, "num_inference_steps": 2, "seed": 1}
CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている", "富士山と雲"]

ANYWHERE = [r"Removed \d+ folder\(s\) left by stopped servers: .*"]
PREDICTION_LINES = [  # predict.py, jsd.serving, jsd.optimize, jsd.lora_weights, and the token report (jsd.prompting)
    r"fast path on \w+: .*",
    r"Loaded .* \(revision .*\) on .*: verify [\d.]+ s, load [\d.]+ s",
    r"Default LoRA \(COG_WEIGHTS\) .*, sha256 [0-9a-f]+",
    r"No Japanese CLIP scorer in .*: `num_candidates` above 1 is refused\.",
    r"Japanese CLIP scorer \(\w+\) loaded: best-of-N is available\.",
    r"No fast-mode LoRA in .*: `fast_mode` other than 'off' is refused\.",  # fast mode (predict.py, jsd.serving)
    r"Fast modes:",
    r"[\w-]+: [\w +.-]+, \d+ steps, guidance [\d.]+; .*, sha256 [0-9a-f]+",
    r"Fast mode [\w-]+: .*, \d+ steps, guidance [\d.]+",
    r"Image \d+ candidate seed \d+: score [\d.]+, (chosen|flagged|not chosen)",  # best-of-N (jsd.serving)
    r"Generating \d+ image\(s\) with seeds \[[\d, ]+\]",
    r"Prompt tokens:",
    r"prompt: .*",
    r"text: .*",
    r"\d+ pieces in \d+ chunk\(s\) \(.*\)",
    r"chunk \d+ \(\d+ pieces\): .*",
    r"truncated(: nothing| \(\d+ pieces\): .*)",
    r"LoRA .* \(sha256 [0-9a-f]{12}\) at scale [\d.]+",
    r"LoRA .* from the cache \(sha256 [0-9a-f]+\)",
    r"Seeds \[[\d, ]+\]; returned \d+ image\(s\)",
    r"\s*\d+%\|.*\| \d+/\d+ \[.*\]",  # diffusers' denoising progress bar: how far a long prediction has come
]
TRAINING_LINES = [  # train.py, jsd.training
    r"Seed \d+",
    r"Training on \d+ of \d+ images \(captions from .*\); \d+ file\(s\) skipped",
    r"\s*skipped .*: .*",  # coglet's own log drops the indent
    r"\s*… and \d+ more \(all of them are listed in training.json\)",
    r"\[RANK \d+\] (Distributed setup: |Process \d+ of \d+ on |Training \w+.* for \d+ steps|Saved |Data by step \d+: "
    r"|Data at the end: ).*",
    r"Steps: .*",  # the trainer's progress bar
    r"Trained on \d+ images \(\d+ skipped\) in \d+ s",
]


# ------------------------------------------------------------------------------------------ helpers
def python_lines(coglet_log: str) -> list[str]:
    """Every line the predictor's or trainer's process wrote (coglet logs them with a ``source``)."""
    lines = []
    for raw in coglet_log.splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            lines.append(raw)  # not coglet's JSON: someone printed straight to the log
            continue
        if record.get("fields", {}).get("source"):
            lines += record["fields"]["message"].replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip()]


def foreign(lines: list[str], ours: list[str]) -> list[str]:
    """The lines none of our patterns matches."""
    patterns = [re.compile(p) for p in [*ours, *ANYWHERE]]
    return [line for line in lines if line.strip() and not any(p.fullmatch(line.rstrip()) for p in patterns)]


def leftovers(folder: Path) -> list[str]:
    # torch creates its compile cache there on import (one per user, reused: not a server's files)
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("torchinductor_"))


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(seed: int, side: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def dataset_zip() -> bytes:
    """Four captioned images, a corrupt image and a file that is not an image."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, caption in enumerate(CAPTIONS):
            zf.writestr(f"mydata/{i:04d}.png", png_bytes(i))
            zf.writestr(f"mydata/{i:04d}.txt", caption)
        zf.writestr("mydata/0004.png", b"\x89PNG broken")
        zf.writestr("mydata/notes.pdf", b"%PDF")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def private_tmp(tmp_path):
    """TMPDIR and the LoRA cache of the servers this test starts (they inherit the environment)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    with mock.patch.dict(os.environ, {"TMPDIR": str(folder), "JSD_LORA_CACHE": str(tmp_path / "lora-cache")}):
        yield folder


@pytest.fixture(scope="module")
def unet_lora(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA of the UNet only (no text-encoder keys: diffusers used to warn about that on every request)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from jsd.lora_weights import LORA_WEIGHT_NAME, UNET_TARGET_MODULES, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGET_MODULES)))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a LoRA that changes nothing): make it do something
            torch.nn.init.normal_(parameter, std=0.5)
    folder = tmp_path_factory.mktemp("unet-lora")
    save_lora(folder, unet)
    return folder / LORA_WEIGHT_NAME


# ------------------------------------------------------------------------------------------ prediction
def test_a_served_prediction_logs_only_our_lines_and_leaves_nothing_behind(
    tiny_checkpoint, private_tmp, unet_lora, tmp_path, capsys
):
    inputs = FAST | {"prompt": "(猫:1.3) 油絵", "lora_weights": data_uri(unet_lora.read_bytes())}
    inputs |= {"image": data_uri(png_bytes(9), "image/png"), "prompt_strength": 0.5, "num_inference_steps": 4}
    with cog_server(tiny_checkpoint) as server:
        assert server.status == "READY", server.logs()[-3000:]
        assert [n.split("-")[:2] for n in leftovers(private_tmp)] == [["jsd", "outputs"]]  # there while it runs
        status, body = server.predict(inputs)
        assert status == 200 and body["status"] == "succeeded", body.get("error")
        client_errors = _client_errors_against(server.url, unet_lora, tmp_path, capsys)
        lines = body["logs"].splitlines() + python_lines(server.logs())

    assert "LoRA data:application/octet-stream;base64," in body["logs"]  # a line of ours: the right text is read
    assert foreign(lines, PREDICTION_LINES) == []
    assert leftovers(private_tmp) == []
    long_prompt, missing_file = client_errors
    assert long_prompt.startswith('Invalid input: `prompt`: "猫猫猫') and len(long_prompt) < 200
    assert long_prompt.endswith('…" (2,345 characters) is longer than 2000 characters'), long_prompt
    assert missing_file.startswith(f"-i lora_weights: no such file {tmp_path / 'nope.tar'} (relative paths start")


def _client_errors_against(url: str, lora: Path, tmp_path: Path, capsys) -> tuple[str, str]:
    """``cog_local.py predict --url``: a LoRA given as @file works; a long prompt and a missing file fail clearly."""
    out = tmp_path / "out"
    size = ["-i", "width=128", "-i", "height=128", "-i", "num_inference_steps=1"]
    assert cog_local.main(["predict", "--url", url, *size, "-i", f"lora_weights=@{lora}", "-o", str(out)]) == 0
    assert (out / "output.0.webp").is_file()
    capsys.readouterr()
    assert cog_local.main(["predict", "--url", url, "-i", "prompt=" + "猫" * 2345, "-o", str(out)]) == 1
    long_prompt = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as missing:
        cog_local.main(["predict", "--url", url, "-i", f"lora_weights=@{tmp_path / 'nope.tar'}"])
    return long_prompt, str(missing.value)


def test_cog_local_predict_leaves_nothing_behind_and_prints_only_our_lines(tiny_checkpoint, private_tmp, tmp_path):
    command = [sys.executable, "scripts/cog_local.py", "predict", "--weights", str(tiny_checkpoint)]
    command += ["-i", "prompt=猫", "-i", "width=128", "-i", "height=128", "-i", "num_inference_steps=1"]
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "out" / "output.0.webp"), str(tmp_path / "out" / "metrics.json")]
    starting = r"Starting coglet \(setup can take a minute; server log: .*\)"  # cog_local's own line
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert foreign(lines, [*PREDICTION_LINES, starting]) == []  # the client imports the predictor too
    assert leftovers(private_tmp) == []


# ------------------------------------------------------------------------------------------ training
def test_a_training_logs_our_lines_names_skipped_files_and_leaves_nothing_behind(
    tiny_checkpoint, private_tmp, tmp_path, capsys
):
    files = LoopbackFiles()
    settings = {"max_train_steps": 2, "resolution": 256, "train_batch_size": 1, "lora_rank": 2, "seed": 0}
    try:
        with cog_server(tiny_checkpoint, train=True) as trainer:
            assert trainer.status == "READY", trainer.logs()[-3000:]
            named = trainer.train({"input_images": files.add("/my-photos.zip", b"not a zip")})[1]
            unnamed = trainer.train({"input_images": data_uri(b"not a zip", "application/zip")})[1]
            (tmp_path / "bad.zip").write_bytes(b"not a zip")
            args = ["train", "--url", trainer.url, "-i", f"input_images=@{tmp_path / 'bad.zip'}", "-o", str(tmp_path)]
            assert cog_local.main(args) == 1
            client = capsys.readouterr().err.strip().splitlines()[-1]
            status, body = trainer.train(settings | {"input_images": data_uri(dataset_zip(), "application/zip")})
            assert status == 200 and body["status"] == "succeeded", body.get("error")
            lines = body["logs"].splitlines() + python_lines(trainer.logs())
            http_example = _run_the_documented_http_training(trainer.url, tmp_path / "http")
    finally:
        files.close()

    reason = "is neither a .zip nor a .tar archive (zip the images with their captions)."
    assert clean_error(named["error"]) == f"`input_images` (my-photos.zip) {reason}"  # the URL's name
    assert clean_error(unnamed["error"]) == f"`input_images` {reason}"  # a data URI has none: no tmp name
    assert client == f"Training failed: `input_images` (bad.zip) {reason}"
    assert "  skipped 0004.png: unreadable image (UnidentifiedImageError)" in body["logs"].splitlines()
    assert "  skipped notes.pdf: not an image" in body["logs"].splitlines()
    assert foreign(lines, TRAINING_LINES) == []
    assert leftovers(private_tmp) == []
    assert http_example.returncode == 0 and http_example.stdout.strip() == "succeeded", http_example.stderr
    with tarfile.open(tmp_path / "http" / "weights.tar") as tar:
        assert "lora.safetensors" in tar.getnames()


def _run_the_documented_http_training(url: str, folder: Path) -> subprocess.CompletedProcess:
    """docs/train-on-replicate.md's curl example, as written but for the port and fewer steps, in ``folder``."""
    text = (REPO / "docs" / "train-on-replicate.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL) if "/trainings -H" in b)
    assert "localhost:5001" in block and '"max_train_steps": 500' in block  # what is replaced below
    fewer_steps = '"max_train_steps": 2, "resolution": 256'
    script = block.replace("localhost:5001", url).replace('"max_train_steps": 500', fewer_steps)
    folder.mkdir()
    (folder / "data.zip").write_bytes(dataset_zip())
    return subprocess.run(["bash", "-e", "-c", script], cwd=folder, capture_output=True, text=True, timeout=600)
