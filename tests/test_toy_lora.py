"""A LoRA trained through the Replicate trainer teaches the toy checkpoint a word it never saw (docs/toy-world.md).

As a user runs it: `train.py` behind coglet's trainings API, 24 captioned pictures of 桜色 (a color no
training caption of the toy checkpoint names) zipped with `metadata.jsonl`; the LoRA it returns is served to
`predict.py` as `lora_weights`. The pixel judge reads the new color; the goal (#22): at least 70 % of the
pictures of a 桜色 prompt show it with the LoRA, and the same prompt at `lora_scale` 0 does not.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from pathlib import Path
from unittest import mock

import pytest
from cogserver import cog_server
from loopback import LoopbackFiles
from PIL import Image

from jsd.coghttp import datauri
from jsd.toyworld import TOY_WEIGHTS, judge, world

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / TOY_WEIGHTS
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (WEIGHTS / "manifest.json").is_file(), reason="no toy checkpoint in toy/weights"),
]
NEW = "桜色"
PALETTE = world.COLORS | world.NEW_COLORS
TRAIN = {
    "max_train_steps": 120,
    "learning_rate": 2e-3,
    "lora_rank": 8,
    "train_text_encoder": True,
    "resolution": 128,
    "train_batch_size": 4,
    "seed": 0,
}


def new_word_scenes(count: int, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [
        world.Scene(rng.choice(list(world.BACKGROUNDS)), NEW, rng.choice(world.SHAPES),
                    rng.choice(list(world.POSITIONS)), rng.choice(list(world.SIZES)))
        for _ in range(count)
    ]  # fmt: skip


def dataset_zip(count: int = 24) -> bytes:
    items = list(world.examples(count, seed=5, scenes=new_word_scenes(count, seed=5)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        lines = []
        for item in items:
            archive.writestr(f"sakura/{item.key}.png", world.png_bytes(item.image))
            lines.append(item.metadata(f"{item.key}.png"))
        archive.writestr("sakura/metadata.jsonl", "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in lines))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lora_url(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-cache")
    files = LoopbackFiles()
    with mock.patch.dict(os.environ, {"JSD_LORA_CACHE": str(cache)}), cog_server(WEIGHTS, train=True) as trainer:
        assert trainer.status == "READY", trainer.logs()[-3000:]
        status, body = trainer.train(
            TRAIN | {"input_images": datauri.encode_bytes(dataset_zip(), "application/zip")}, timeout=900
        )
        assert status == 200 and body["status"] == "succeeded", (body.get("error"), trainer.logs()[-3000:])
        tar = datauri.decode(body["output"]["weights"])[1]
        files.add("/sakura.tar", tar)
        yield files.url("/sakura.tar"), cache, tar
    files.close()


def new_color_share(server, scenes: list[world.Scene], **inputs) -> float:
    shown = 0
    for i, scene in enumerate(scenes):
        request = {"prompt": scene.prompt(), "width": 128, "height": 128, "num_inference_steps": 25, "seed": i}
        status, body = server.predict(request | {"output_format": "png"} | inputs)
        assert status == 200 and body["status"] == "succeeded", body.get("error")
        image = Image.open(io.BytesIO(datauri.decode(body["output"][0])[1]))
        shown += judge.read(image, PALETTE).color == NEW
    return shown / len(scenes)


def test_a_lora_trained_through_the_trainer_draws_the_new_word_and_scale_zero_does_not(lora_url):
    url, cache, _ = lora_url
    scenes = new_word_scenes(12, seed=99)  # other scenes than the training pictures'
    with mock.patch.dict(os.environ, {"JSD_LORA_CACHE": str(cache)}), cog_server(WEIGHTS) as server:
        assert server.status == "READY", server.logs()[-3000:]
        with_lora = new_color_share(server, scenes, lora_weights=url, lora_scale=1.0)
        without = new_color_share(server, scenes, lora_weights=url, lora_scale=0.0)
    print(f"{NEW} shown: {with_lora:.0%} with the LoRA, {without:.0%} at lora_scale 0")
    assert with_lora >= 0.7, (with_lora, without)
    assert without <= 0.3, (with_lora, without)


def test_evaluate_compare_finds_the_lora_above_its_base_on_its_own_word(lora_url, tmp_path, capsys):
    """`jsd evaluate --compare` as the docs give it: the LoRA (A) against the base model (B) on prompts naming
    the new word; the toy Japanese CLIP knows 桜色 (docs/toy-world.md), the base model does not."""
    from jsd import cli

    (tmp_path / "sakura.tar").write_bytes(lora_url[2])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(s.prompt() + "\n" for s in new_word_scenes(12, seed=98)), encoding="utf-8")
    out = tmp_path / "evaluation"
    cli.main(["evaluate", "--weights", str(WEIGHTS), "--lora_weights", str(tmp_path / "sakura.tar"),
              "--compare", str(WEIGHTS), "--prompts", str(prompts), "--width", "128", "--height", "128",
              "--output_dir", str(out), "--device", "cpu"])  # fmt: skip
    print(capsys.readouterr().out[-600:])
    difference = json.loads((out / "report.json").read_text(encoding="utf-8"))["difference_a_minus_b"]
    assert difference["low"] > 0, difference
