"""LoRA fine-tuning through Cog: train.py behind coglet's trainings API, its LoRA in predict.py, on 127.0.0.1.

One train-mode server and two predictors (without and with ``COG_WEIGHTS``) for the whole module; the
LoRAs are served by a loopback HTTP server. Tiny checkpoint, CPU, 4 training steps.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from cogserver import cog_local, cog_server
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from loopback import LoopbackFiles
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from jsd.lora_weights import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, TRAINING_INFO_NAME, UNET_TARGET_MODULES, save_lora
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.schedulers import make_scheduler
from jsd.tiny import unet_config

pytestmark = pytest.mark.slow
CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている", "富士山と雲"]
# Few steps at a high rate: the LoRA must change the image clearly, or "equal to diffusers" proves nothing.
TRAIN = {
    "max_train_steps": 4,
    "learning_rate": 1e-2,
    "lora_rank": 4,
    "train_text_encoder": True,
    "resolution": 256,
    "train_batch_size": 1,
    "seed": 0,
    "caption_prefix": "テスト",
}
PROMPT = "テスト 猫が寝ている"
REQUEST = {"prompt": PROMPT, "width": 128, "height": 128, "num_inference_steps": 2, "seed": 7}
REQUEST |= {"scheduler": "DDIM", "output_format": "png"}


# ------------------------------------------------------------------------------------------ helpers
def png_bytes(seed: int, size: tuple[int, int] = (300, 260)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes | str], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as `zip --symlinks` stores it
            zf.writestr(info, target)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], *, links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def dataset_zip() -> bytes:
    """Four images in one folder, captioned by a .txt each (as a user zips a folder)."""
    files: dict[str, bytes | str] = {}
    for i, caption in enumerate(CAPTIONS):
        files[f"mydata/{i:04d}.png"] = png_bytes(i)
        files[f"mydata/{i:04d}.txt"] = caption
    return zip_bytes(files)


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_uri(uri: str) -> bytes:
    return base64.b64decode(uri.partition(",")[2])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def predicted(server, **inputs) -> bytes:
    status, body = server.predict(REQUEST | inputs)
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    return decode_uri(body["output"][0])


def assert_ready(server) -> None:
    assert server.settled_status(timeout=30) == "READY"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files():
    server = LoopbackFiles()
    yield server
    server.close()


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory):
    """The servers' LoRA cache (JSD_LORA_CACHE), apart from any other on this machine."""
    folder = tmp_path_factory.mktemp("lora-cache")
    with mock.patch.dict(os.environ, {"JSD_LORA_CACHE": str(folder)}):
        yield folder


@pytest.fixture(scope="module")
def trainer(tiny_checkpoint, lora_cache):
    with cog_server(tiny_checkpoint, train=True) as server:
        assert server.status == "READY", server.logs()[-3000:]
        yield server


@pytest.fixture(scope="module")
def trained(trainer, files, tmp_path_factory) -> dict:
    """One training over HTTP; its .tar is served at ``files.url("/trained.tar")``."""
    start = time.monotonic()
    status, body = trainer.train(TRAIN | {"input_images": data_uri(dataset_zip(), "application/zip")})
    seconds = time.monotonic() - start
    assert status == 200 and body["status"] == "succeeded", (body.get("error"), trainer.logs()[-3000:])
    data = decode_uri(body["output"]["weights"])
    folder = tmp_path_factory.mktemp("trained")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(folder, filter="data")
    files.add("/trained.tar", data)
    return {"tar": data, "names": names, "folder": folder, "seconds": seconds}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, lora_cache, trained):
    with cog_server(tiny_checkpoint) as server:
        assert server.status == "READY", server.logs()[-3000:]
        yield server


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The same components in plain diffusers: what a diffusers user of the LoRA gets."""
    return JapaneseStableDiffusionPipeline.from_pretrained(tiny_checkpoint, use_safetensors=True)


def diffusers_image(reference, lora_folder: Path | None, scale: float = 1.0) -> np.ndarray:
    pipe = StableDiffusionPipeline(**reference.components)
    pipe.scheduler = make_scheduler(REQUEST["scheduler"], reference.scheduler.config)
    kwargs = {}
    if lora_folder is not None:
        pipe.load_lora_weights(lora_folder, weight_name=LORA_WEIGHT_NAME)
        kwargs["cross_attention_kwargs"] = {"scale": scale}
    try:
        image = pipe(
            prompt=PROMPT,
            width=REQUEST["width"],
            height=REQUEST["height"],
            num_inference_steps=REQUEST["num_inference_steps"],
            generator=[torch.Generator("cpu").manual_seed(REQUEST["seed"])],
            **kwargs,
        ).images[0]
    finally:
        pipe.unload_lora_weights()
    return np.asarray(image).astype(np.int16)


# ------------------------------------------------------------------------------------------ training
def test_the_trainer_schema_has_training_input_and_validates_it(trainer):
    status, schema = trainer.request("GET", "/openapi.json")
    assert status == 200
    properties = schema["components"]["schemas"]["TrainingInput"]["properties"]
    assert {"input_images", "caption_prefix", "max_train_steps", "lora_rank", "train_text_encoder"} <= set(properties)
    assert schema["components"]["schemas"]["TrainingOutput"]["properties"]["weights"]["format"] == "uri"
    assert "/trainings" in schema["paths"] and "/predictions" in schema["paths"]  # one schema, as cog build writes

    status, body = trainer.train({"input_images": data_uri(b"x"), "lora_rank": 0})
    assert status == 422 and any(d["loc"][-1] == "lora_rank" for d in body["detail"]), body
    assert (properties["min_clip_score"]["minimum"], properties["min_clip_score"]["maximum"]) == (0, 100)
    status, body = trainer.train({"input_images": data_uri(b"x"), "min_clip_score": 120})
    assert status == 422 and any(d["loc"][-1] == "min_clip_score" for d in body["detail"]), body
    assert_ready(trainer)


def test_a_training_over_http_returns_a_tar_with_both_lora_files_and_the_settings(trained):
    assert sorted(trained["names"]) == sorted([LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, TRAINING_INFO_NAME])
    info = json.loads((trained["folder"] / TRAINING_INFO_NAME).read_text(encoding="utf-8"))
    assert info["settings"] == TRAIN | {"min_clip_score": None, "validation_prompts": []}  # the defaults
    assert "clip_filter" not in info and "validation" not in info
    assert info["data"]["images_used"] == 4 and info["data"]["captions_used"] == 4
    assert info["data"]["caption_source"] == "txt" and info["steps"] == 4
    assert info["base_model"]["revision"] == "tiny-seed0"
    print(f"\ntraining over HTTP: {trained['seconds']:.1f} s; tar {len(trained['tar']):,} bytes")


# ------------------------------------------------------------------------------------------ prediction
def test_the_lora_in_the_predictor_equals_plain_diffusers_and_changes_the_image(server, trained, files, reference):
    ours = pixels(predicted(server, lora_weights=files.url("/trained.tar")))
    theirs = diffusers_image(reference, trained["folder"])
    base = pixels(predicted(server))

    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - base).mean() > 3  # the LoRA really does something


def test_the_kohya_file_gives_the_same_image_as_the_diffusers_file(server, trained, files):
    kohya = (trained["folder"] / KOHYA_WEIGHT_NAME).read_bytes()
    from_kohya = pixels(predicted(server, lora_weights=data_uri(kohya)))
    from_tar = pixels(predicted(server, lora_weights=files.url("/trained.tar")))

    assert np.abs(from_kohya - from_tar).max() <= 1


def test_lora_scale_reaches_the_text_encoder_as_in_diffusers(server, trained, files, reference):
    # the trained file has text-encoder layers that learned something (else the text encoder's scale is unseen)
    layers = load_file(trained["folder"] / LORA_WEIGHT_NAME)
    text_ups = [v for k, v in layers.items() if k.startswith("text_encoder.") and k.endswith("up.weight")]
    assert text_ups and all(v.abs().max() > 0 for v in text_ups)
    half = pixels(predicted(server, lora_weights=files.url("/trained.tar"), lora_scale=0.5))

    assert np.abs(half - diffusers_image(reference, trained["folder"], scale=0.5)).max() <= 1


def test_scale_zero_and_no_lora_give_the_base_image_bit_exactly(server, files, trained):
    base = predicted(server)
    zero = predicted(server, lora_weights=files.url("/trained.tar"), lora_scale=0)
    with_lora = predicted(server, lora_weights=files.url("/trained.tar"))
    after = predicted(server)  # the adapters were unloaded when the previous request ended

    assert np.array_equal(pixels(zero), pixels(base))  # the files differ only in their lora_* metadata
    assert after == base
    assert with_lora != base


def test_downloads_are_cached_and_a_changed_cache_file_is_fetched_again(server, files, trained, lora_cache):
    url = files.add("/cached.tar", trained["tar"])
    first = predicted(server, lora_weights=url)
    predicted(server, lora_weights=url)
    assert files.hits["/cached.tar"] == 1  # the second request used the cache

    for cached in lora_cache.glob("*.safetensors"):  # damage what another process might share
        cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    again = predicted(server, lora_weights=url)

    assert files.hits["/cached.tar"] == 2 and again == first


def lora_for(tmp_path: Path, config: dict) -> bytes:
    """A LoRA of the UNet attention of another UNet architecture (``unet_config`` overrides)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(unet_config("tiny", 32) | config))
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGET_MODULES))
    )
    save_lora(tmp_path, unet)
    return (tmp_path / LORA_WEIGHT_NAME).read_bytes()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"block_out_channels": (64, 128)}, "does not fit this model"),  # other shapes
        (  # the same first block, and attention layers the tiny UNet does not have: other keys
            {"down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2},
            "match layers of this model",
        ),
    ],
)
def test_a_lora_for_another_model_fails_the_prediction_naming_lora_weights(server, tmp_path, config, needle):
    base = predicted(server)
    status, body = server.predict(REQUEST | {"lora_weights": data_uri(lora_for(tmp_path, config))})

    assert status == 200 and body["status"] == "failed"
    assert "`lora_weights`" in body["error"] and needle in body["error"], body["error"]
    assert_ready(server)
    assert predicted(server) == base  # nothing of it stayed loaded


def test_cog_weights_is_the_default_lora_of_a_trained_version(tiny_checkpoint, files, trained, server, lora_cache):
    with_lora = predicted(server, lora_weights=files.url("/trained.tar"))
    base = predicted(server)
    with (
        mock.patch.dict(os.environ, {"COG_WEIGHTS": files.url("/trained.tar")}),
        cog_server(tiny_checkpoint) as version,
    ):
        assert version.status == "READY", version.logs()[-3000:]
        default = predicted(version)
        zero = predicted(version, lora_scale=0)

    assert np.abs(pixels(default) - pixels(with_lora)).max() <= 1
    assert np.abs(pixels(zero) - pixels(base)).max() <= 1


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("archive", "needles"),
    [
        (zip_bytes({}), ["is empty"]),
        (zip_bytes({"readme.txt": "猫"}), ["holds no images", "readme.txt"]),
        (zip_bytes({"0.png": png_bytes(0)}), ["has a caption", "metadata.jsonl"]),
        (zip_bytes({"0.png": b"\x89PNG garbage", "0.txt": "猫", "1.pdf": b"%PDF"}), ["0.png: unreadable image"]),
        (zip_bytes({"../evil.png": png_bytes(0), "../evil.txt": "猫"}), ["'../evil.png'", "escapes"]),
        (zip_bytes({"/tmp/evil.png": png_bytes(0)}), ["'/tmp/evil.png'", "absolute"]),
        (zip_bytes({"0.png": png_bytes(0)}, symlinks={"link.png": "/etc/passwd"}), ["'link.png'", "symbolic link"]),
        (tar_bytes({"0.txt": b"x"}, links={"link.png": (tarfile.SYMTYPE, "/etc/passwd")}), ["'link.png'", "link"]),
        (tar_bytes({"0.txt": b"x"}, links={"hard.png": (tarfile.LNKTYPE, "0.txt")}), ["'hard.png'", "link"]),
        (zip_bytes({"0.png": png_bytes(0), "0.txt": "a" * (2 << 20)}), ["'0.txt'", "decompression bomb"]),
        (b"just some text", ["neither a .zip nor a .tar"]),
    ],
    ids=[
        "empty",
        "text-only",
        "no-caption",
        "corrupt",
        "dot-dot",
        "absolute",
        "zip-symlink",
        "tar-symlink",
        "tar-hardlink",
        "bomb",
        "not-an-archive",
    ],
)
def test_bad_archives_fail_the_training_naming_input_images_and_the_file(trainer, archive, needles):
    start = time.monotonic()
    status, body = trainer.train(TRAIN | {"input_images": data_uri(archive)})

    assert status == 200 and body["status"] == "failed", body
    assert "`input_images`" in body["error"] and all(n in body["error"] for n in needles), body["error"]
    assert time.monotonic() - start < 30  # refused before any model work
    assert_ready(trainer)


def test_cancelling_a_training_leaves_the_server_ready_for_the_next(trainer, tmp_path, capsys):
    slow = TRAIN | {"max_train_steps": 10_000, "input_images": data_uri(dataset_zip())}
    with trainer.running("trainings", "slow-1", slow) as result:
        time.sleep(3)  # into the training loop
        assert trainer.request("POST", "/trainings/slow-1/cancel")[0] == 200
    status, body = result["response"]
    assert status == 200 and body["status"] == "canceled", body.get("error")
    assert_ready(trainer)

    # the next training works (accelerate's process state was reset), through `cog_local.py train`
    (tmp_path / "data.zip").write_bytes(dataset_zip())
    inputs = ["max_train_steps=1", "resolution=256", "train_batch_size=1", "lora_rank=2"]
    args = ["train", "--url", trainer.url, "-i", f"input_images=@{tmp_path / 'data.zip'}", "-o", str(tmp_path / "out")]
    code = cog_local.main(args + [arg for pair in zip(["-i"] * 4, inputs, strict=True) for arg in pair])
    assert code == 0, capsys.readouterr().err[-3000:]
    with tarfile.open(tmp_path / "out" / "weights.tar") as tar:
        assert LORA_WEIGHT_NAME in tar.getnames()
