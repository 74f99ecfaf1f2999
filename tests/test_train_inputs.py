"""Every input of train.py's ``train()``, seen in what the trainer ran with and in the file it wrote.

train.py is called as Cog calls it (in this process, on the tiny checkpoint), with a spy on the trainer's real
step (:func:`jsd.training.trainer.batch_loss`) that records the batches it saw — their pixel size, batch size
and captions — and the optimizer's learning rate at each step. The trained ``lora.safetensors`` is read back
for its rank, its modules and its text-encoder keys. Echoing ``training.json`` back would prove nothing: it is
written from the settings themselves.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from repofiles import REPO
from safetensors.torch import load_file

from jsd.lora_weights import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from jsd.training import trainer

pytestmark = pytest.mark.slow
CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている", "富士山と雲"]
# Every input away from its default (train.py's Input defaults: each one replaced by its default fails a test below),
# and apart from each other (steps ≠ batch size ≠ rank).
SETTINGS = {
    "caption_prefix": "テストの絵、",
    "max_train_steps": 3,
    "learning_rate": 3e-3,
    "lora_rank": 5,
    "train_text_encoder": True,
    "resolution": 256,
    "train_batch_size": 1,  # the default is 2
    "seed": 5,
    # Japanese CLIP inputs off (called directly, an input left out would be its Input(...) object); they are
    # pinned by tests/test_train_clip.py
    "min_clip_score": None,
    "validation_prompts": "",
}


def dataset_zip(path: Path) -> Path:
    """Four images of different sizes, captioned by a .txt each."""
    with zipfile.ZipFile(path, "w") as zf:
        for i, caption in enumerate(CAPTIONS):
            pixels = np.random.default_rng(i).integers(0, 255, (260 + 10 * i, 300, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            zf.writestr(f"data/{i}.png", buffer.getvalue())
            zf.writestr(f"data/{i}.txt", caption)
    return path


@pytest.fixture(scope="module")
def train_module():
    """train.py as coglet imports it: registered in sys.modules (cog's BaseModel, a dataclass, looks itself up)."""
    spec = importlib.util.spec_from_file_location("jsd_cog_train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {spec.name: module}):
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def run_training(train_module, tiny_checkpoint, tmp_path_factory):
    """``run_training(**settings)``: train.py's train() → {"files": {name: tensors}, "steps": [what each step saw]}."""
    archive = dataset_zip(tmp_path_factory.mktemp("data") / "data.zip")

    def run(**settings) -> dict:
        steps, optimizers = [], []
        real_loss, real_optimizer = trainer.batch_loss, trainer.make_optimizer

        def spy_optimizer(*args, **kwargs):
            optimizers.append(real_optimizer(*args, **kwargs))
            return optimizers[-1]

        def spy_loss(accelerator, config, components, batch, generator):
            lrs = {group["lr"] for group in optimizers[-1].param_groups}
            steps.append({"shape": tuple(batch["pixel_values"].shape), "texts": list(batch["text"]), "lr": lrs})
            return real_loss(accelerator, config, components, batch, generator)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same float maths in every run (and two cores shared)
        try:
            with (
                mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(tiny_checkpoint)}),
                mock.patch.object(train_module, "_output_dir", return_value=tmp_path_factory.mktemp("output")),
                mock.patch.object(trainer, "batch_loss", spy_loss),
                mock.patch.object(trainer, "make_optimizer", spy_optimizer),
            ):
                output = train_module.train(input_images=train_module.Path(archive), **settings)
        finally:
            torch.set_num_threads(threads)
        folder = tmp_path_factory.mktemp("trained")
        with tarfile.open(output.weights) as tar:
            tar.extractall(folder, filter="data")
        return {
            "lora": load_file(folder / LORA_WEIGHT_NAME),
            "kohya": load_file(folder / KOHYA_WEIGHT_NAME),
            "bytes": (folder / LORA_WEIGHT_NAME).read_bytes(),
            "steps": steps,
        }

    return run


@pytest.fixture(scope="module")
def trained(run_training) -> dict:
    return run_training(**SETTINGS)


def test_resolution_and_train_batch_size_are_what_each_step_saw(trained):
    assert [s["shape"] for s in trained["steps"]] == [(1, 3, 256, 256)] * 3


def test_max_train_steps_is_the_number_of_steps_taken(trained):
    assert len(trained["steps"]) == SETTINGS["max_train_steps"]


def test_learning_rate_is_the_optimizers_rate_at_every_step(trained):
    assert all(s["lr"] == {SETTINGS["learning_rate"]} for s in trained["steps"])


def test_caption_prefix_starts_every_caption_the_text_encoder_saw(trained):
    texts = [t for s in trained["steps"] for t in s["texts"]]
    assert len(texts) == 3  # 3 steps of 1
    assert all(t.startswith(SETTINGS["caption_prefix"]) and t.removeprefix(SETTINGS["caption_prefix"]) for t in texts)
    assert {t.removeprefix(SETTINGS["caption_prefix"]).strip() for t in texts} <= set(CAPTIONS)


def test_lora_rank_is_the_rank_of_every_trained_layer(trained):
    # diffusers' names: unet "….lora.down/up.weight", text encoder "….lora_linear_layer.down/up.weight"
    downs = {v.shape[0] for k, v in trained["lora"].items() if k.endswith("down.weight")}
    ups = {v.shape[1] for k, v in trained["lora"].items() if k.endswith("up.weight")}
    assert downs == ups == {SETTINGS["lora_rank"]}
    assert {float(v) for k, v in trained["kohya"].items() if k.endswith(".alpha")} == {float(SETTINGS["lora_rank"])}


def test_train_text_encoder_puts_lora_layers_on_the_text_encoders_attention(trained, run_training):
    def modules(lora: dict, prefix: str) -> set[str]:
        return {k.split(".lora")[0].rsplit(".", 1)[-1] for k in lora if k.startswith(prefix)}

    assert modules(trained["lora"], "unet.") == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert modules(trained["lora"], "text_encoder.") == {"q_proj", "k_proj", "v_proj", "out_proj"}
    unet_only = run_training(**SETTINGS | {"train_text_encoder": False, "max_train_steps": 1})
    assert not [k for k in unet_only["lora"] if not k.startswith("unet.")]
    assert modules(unet_only["lora"], "unet.") == {"to_q", "to_k", "to_v", "0"}


def test_the_seed_decides_the_result(trained, run_training):
    again = run_training(**SETTINGS)
    other = run_training(**SETTINGS | {"seed": 6})
    assert again["bytes"] == trained["bytes"]
    assert [s["texts"] for s in again["steps"]] == [s["texts"] for s in trained["steps"]]
    assert other["bytes"] != trained["bytes"]
    differs = [k for k, v in other["lora"].items() if not torch.equal(v, trained["lora"][k])]
    assert len(differs) == len(trained["lora"])  # every layer: the adapters' initialisation is seeded too
