"""Every input of predict.py's ``run()``, its setup (``JSD_WEIGHTS``, ``COG_WEIGHTS``) and ``jsd generate``'s flags,
seen in what comes out: the real Predictor and CLI against diffusers' own pipelines on the same components.

Each test sets its inputs away from their defaults (and apart from each other: width ≠ height, steps ≠ outputs),
so an input that is ignored, replaced by its default or passed to another parameter gives other pixels, another
size or another count. Which test pins which input is listed in docs/development.md ("Inputs and their tests").
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from reference import (
    diffusers_images,
    half_mask,
    pattern_image,
    phone_photo,
    pil_encoded,
    read_pixels,
    weighted_embeds,
)
from repofiles import load_repo_module
from transformers import CLIPTextModel

from jsd.cli import main
from jsd.lora_weights import LORA_WEIGHT_NAME, TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, save_lora
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.serving import NSFWError
from jsd.tiny import make_checkpoint, set_nsfw_flagging

PROMPT, NEGATIVE = "夜の東京 油絵", "ぼやけた 低品質"
# Every txt2img input away from its default; width ≠ height and num_inference_steps ≠ num_outputs.
TXT2IMG = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "width": 192,
    "height": 128,
    "num_outputs": 2,
    "num_inference_steps": 3,
    "guidance_scale": 3.0,
    "scheduler": "Euler",
    "seed": 11,
}
TOLERANCE = 1  # uint8 levels: the same float maths, rounded once


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() <= TOLERANCE, f"differs by up to {np.abs(a - b).max()} levels"


def reference_kwargs(inputs: dict) -> dict:
    """diffusers' call arguments for ``inputs`` (the user's names → diffusers' names, written out once here)."""
    seeds = [inputs["seed"] + i for i in range(inputs["num_outputs"])]
    kwargs = {
        "scheduler": inputs["scheduler"],
        "seeds": seeds,
        "num_inference_steps": inputs["num_inference_steps"],
        "guidance_scale": inputs["guidance_scale"],
        "height": inputs["height"],
        "width": inputs["width"],
        "prompt": inputs["prompt"],
        "negative_prompt": inputs["negative_prompt"] or None,
    }
    if "prompt_strength" in inputs:
        kwargs["strength"] = inputs["prompt_strength"]
    return kwargs


# ------------------------------------------------------------------------------------------ the Predictor
@pytest.fixture(scope="module")
def predict_module():
    return load_repo_module("predict.py")


def run_defaults(predict_module) -> dict:
    """run()'s declared defaults, as Cog fills them in."""
    signature = inspect.signature(predict_module.Predictor.run)
    return {name: p.default.default for name, p in signature.parameters.items() if name != "self"}


@pytest.fixture(scope="module")
def predictor(predict_module, tiny_checkpoint):
    with mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(tiny_checkpoint)}):
        predictor = predict_module.Predictor()
        predictor.setup()
    return predictor


@pytest.fixture(scope="module")
def components(predictor) -> dict:
    return dict(predictor.generator.pipeline.components)


def predicted(predictor, predict_module, **inputs) -> list[np.ndarray]:
    paths = predictor.run(**run_defaults(predict_module) | {"output_format": "png"} | inputs)
    return [read_pixels(p) for p in paths]


def test_txt2img_inputs_reach_the_pipeline(predictor, predict_module, components):
    """prompt, negative_prompt, width, height, num_outputs, num_inference_steps, guidance_scale, scheduler, seed."""
    ours = predicted(predictor, predict_module, **TXT2IMG, prompt_weighting=False)
    assert_same(ours, diffusers_images(components, **reference_kwargs(TXT2IMG)))
    assert ours[0].shape == (128, 192, 3)


@pytest.mark.parametrize("scheduler", ["DPM-Solver++ 2M", "PNDM"])  # Euler: the test above
def test_each_scheduler_is_the_named_diffusers_sampler(predictor, predict_module, components, scheduler):
    inputs = TXT2IMG | {"scheduler": scheduler, "num_outputs": 1}
    ours = predicted(predictor, predict_module, **inputs, prompt_weighting=False)
    assert_same(ours, diffusers_images(components, **reference_kwargs(inputs)))


def test_prompt_weighting_on_weights_the_text_and_off_reads_brackets_as_text(predictor, predict_module, components):
    inputs = TXT2IMG | {"prompt": "(油絵:1.8)", "negative_prompt": "", "num_outputs": 1}
    on = predicted(predictor, predict_module, **inputs, prompt_weighting=True)
    off = predicted(predictor, predict_module, **inputs, prompt_weighting=False)

    literal = reference_kwargs(inputs)
    weighted = literal | {"prompt": None, "negative_prompt": None}
    weighted["prompt_embeds"] = weighted_embeds(components, "油絵", 1.8)
    weighted["negative_prompt_embeds"] = weighted_embeds(components, "", 1.0)
    assert_same(on, diffusers_images(components, **weighted))
    assert_same(off, diffusers_images(components, **literal))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """An image and a mask as a phone stores them (EXIF-rotated JPEGs), and what a viewer shows of them."""
    folder = tmp_path_factory.mktemp("photos")
    image = phone_photo(folder / "image.jpg", pattern_image(192, 128, seed=1))
    mask = phone_photo(folder / "mask.jpg", half_mask(192, 128))
    return {"image": folder / "image.jpg", "mask": folder / "mask.jpg", "upright": image, "upright_mask": mask}


def test_img2img_takes_the_upright_photo_and_prompt_strength(predictor, predict_module, components, photos):
    inputs = TXT2IMG | {"num_outputs": 1, "num_inference_steps": 4, "prompt_strength": 0.5}
    ours = predicted(predictor, predict_module, **inputs, image=photos["image"], prompt_weighting=False)
    assert_same(ours, diffusers_images(components, **reference_kwargs(inputs), image=photos["upright"]))


def test_inpainting_takes_the_upright_mask_and_prompt_strength(predictor, predict_module, components, photos):
    inputs = TXT2IMG | {"num_outputs": 1, "num_inference_steps": 4, "prompt_strength": 0.6}
    ours = predicted(
        predictor, predict_module, **inputs, image=photos["image"], mask=photos["mask"], prompt_weighting=False
    )
    theirs = diffusers_images(
        components, **reference_kwargs(inputs), image=photos["upright"], mask_image=photos["upright_mask"]
    )
    assert_same(ours, theirs)
    # the mask matters here: without it (img2img of the same image) the pixels are others
    img2img = diffusers_images(components, **reference_kwargs(inputs), image=photos["upright"])
    assert np.abs(ours[0] - img2img[0]).mean() > 3


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_output_quality_is_the_encoders_quality(predictor, predict_module, fmt):
    inputs = TXT2IMG | {"num_outputs": 1, "num_inference_steps": 1}
    (lossless,) = predicted(predictor, predict_module, **inputs)
    decoded = {}
    for quality in (10, 100):
        (path,) = predictor.run(
            **run_defaults(predict_module) | inputs | {"output_format": fmt, "output_quality": quality}
        )
        assert path.suffix == f".{fmt}"
        decoded[quality] = read_pixels(path)
        expected = pil_encoded(lossless, {"webp": "WEBP", "jpg": "JPEG"}[fmt], quality)
        assert np.array_equal(decoded[quality], expected), f"{fmt} at quality {quality}"
    assert np.abs(decoded[10] - decoded[100]).mean() > 1


def test_disable_safety_checker_returns_what_the_checker_would_flag(predictor, predict_module, components):
    inputs = TXT2IMG | {"num_outputs": 1}
    set_nsfw_flagging(predictor.generator.pipeline.safety_checker, "always")
    try:
        with pytest.raises(NSFWError):
            predicted(predictor, predict_module, **inputs, disable_safety_checker=False)
        ours = predicted(predictor, predict_module, **inputs, disable_safety_checker=True, prompt_weighting=False)
    finally:
        set_nsfw_flagging(predictor.generator.pipeline.safety_checker, "never")
    assert_same(ours, diffusers_images(components, **reference_kwargs(inputs)))


@pytest.fixture(scope="module")
def lora_file(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA on the tiny UNet and text encoder whose up-weights are not zero (peft starts them at zero)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGET_MODULES)))
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(TEXT_ENCODER_TARGET_MODULES)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module in (unet, text_encoder):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(parameter, std=1.0)
    folder = tmp_path_factory.mktemp("lora")
    save_lora(folder, unet, text_encoder)
    return folder / LORA_WEIGHT_NAME


def test_lora_weights_and_lora_scale_reach_unet_and_text_encoder(predictor, predict_module, components, lora_file):
    inputs = TXT2IMG | {"num_outputs": 1}
    ours = predicted(
        predictor, predict_module, **inputs, lora_weights=str(lora_file), lora_scale=0.6, prompt_weighting=False
    )
    theirs = diffusers_images(components, **reference_kwargs(inputs), lora=lora_file, lora_scale=0.6)
    assert_same(ours, theirs)
    base = diffusers_images(components, **reference_kwargs(inputs))
    assert np.abs(ours[0] - base[0]).mean() > 3  # the LoRA does something at this scale


def test_cog_weights_is_the_default_lora_and_jsd_weights_the_checkpoint(
    predict_module, tiny_checkpoint, tmp_path_factory, lora_file
):
    """setup(weights) (Cog's COG_WEIGHTS) applies to requests without lora_weights; JSD_WEIGHTS picks the model."""
    other = make_checkpoint(tmp_path_factory.mktemp("other") / "weights", seed=1)
    with mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(other)}):
        version = predict_module.Predictor()
        version.setup(str(lora_file))
    inputs = TXT2IMG | {"num_outputs": 1}
    ours = predicted(version, predict_module, **inputs, lora_scale=0.6, prompt_weighting=False)
    parts = dict(JapaneseStableDiffusionPipeline.from_pretrained(other).components)  # loaded apart from setup()
    assert_same(ours, diffusers_images(parts, **reference_kwargs(inputs), lora=lora_file, lora_scale=0.6))


# ------------------------------------------------------------------------------------------ jsd generate
CLI_TXT2IMG = ["--negative_prompt", NEGATIVE, "--width", "192", "--height", "128", "--num_outputs", "2"]
CLI_TXT2IMG += ["--steps", "3", "--guidance_scale", "3.0", "--scheduler", "Euler", "--seed", "11"]


def generated(checkpoint: Path, out: Path, *args: str) -> list[np.ndarray]:
    main(["generate", PROMPT, "--weights", str(checkpoint), *args, "-o", str(out)])
    files = sorted(out.parent.glob(f"{out.stem}*{out.suffix}"))
    return [read_pixels(p) for p in files]


def test_cli_flags_reach_the_pipeline(tiny_checkpoint, tmp_path, components, capsys):
    ours = generated(tiny_checkpoint, tmp_path / "out.png", *CLI_TXT2IMG, "--device", "cpu")
    assert_same(ours, diffusers_images(components, **reference_kwargs(TXT2IMG)))
    assert "seed: 11" in capsys.readouterr().out


def test_cli_image_mask_and_strength(tiny_checkpoint, tmp_path, components, photos):
    inputs = TXT2IMG | {"num_outputs": 1, "num_inference_steps": 4, "prompt_strength": 0.5}
    args = [*CLI_TXT2IMG, "--num_outputs", "1", "--steps", "4", "--strength", "0.5", "--image", str(photos["image"])]
    img2img = generated(tiny_checkpoint, tmp_path / "i2i.png", *args)
    inpaint = generated(tiny_checkpoint, tmp_path / "inp.png", *args, "--mask", str(photos["mask"]))

    assert_same(img2img, diffusers_images(components, **reference_kwargs(inputs), image=photos["upright"]))
    theirs = diffusers_images(
        components, **reference_kwargs(inputs), image=photos["upright"], mask_image=photos["upright_mask"]
    )
    assert_same(inpaint, theirs)


def test_cli_prompt_weighting_and_lora(tiny_checkpoint, tmp_path, components, lora_file):
    inputs = TXT2IMG | {"prompt": PROMPT, "num_outputs": 1}
    args = [*CLI_TXT2IMG, "--num_outputs", "1"]
    # on by default in the CLI, as in Cog; --no-prompt_weighting: brackets are text
    plain = ["generate", "(油絵:1.8)", "--weights", str(tiny_checkpoint), *args]
    main([*plain, "--no-prompt_weighting", "-o", str(tmp_path / "off.png")])
    main([*plain, "-o", str(tmp_path / "on.png")])
    literal = reference_kwargs(inputs | {"prompt": "(油絵:1.8)"})
    weighted = literal | {"prompt": None, "negative_prompt": None}
    weighted["prompt_embeds"] = weighted_embeds(components, "油絵", 1.8)
    weighted["negative_prompt_embeds"] = weighted_embeds(components, NEGATIVE, 1.0)
    assert_same([read_pixels(tmp_path / "off.png")], diffusers_images(components, **literal))
    assert_same([read_pixels(tmp_path / "on.png")], diffusers_images(components, **weighted))

    lora_args = ["--lora_weights", str(lora_file), "--lora_scale", "0.6"]
    ours = generated(tiny_checkpoint, tmp_path / "lora.png", *args, *lora_args)
    assert_same(ours, diffusers_images(components, **reference_kwargs(inputs), lora=lora_file, lora_scale=0.6))


def test_cli_disable_safety_checker(tmp_path_factory, tmp_path, capsys):
    flagging = make_checkpoint(tmp_path_factory.mktemp("nsfw") / "weights", nsfw="always")
    args = [*CLI_TXT2IMG, "--num_outputs", "1"]
    with pytest.raises(SystemExit) as refused:
        generated(flagging, tmp_path / "checked.png", *args)
    assert refused.value.code == 2 and "flagged as NSFW" in capsys.readouterr().err
    ours = generated(flagging, tmp_path / "unchecked.png", *args, "--disable_safety_checker")
    parts = dict(JapaneseStableDiffusionPipeline.from_pretrained(flagging).components)
    assert_same(ours, diffusers_images(parts, **reference_kwargs(TXT2IMG | {"num_outputs": 1})))


def test_cli_device_reaches_the_loader(tiny_checkpoint, tmp_path, capsys):
    """``--device``: on this CPU-only machine, asking for CUDA must fail in torch, not silently run on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = ["generate", PROMPT, "--weights", str(tiny_checkpoint), *CLI_TXT2IMG, "--device", "cuda"]
    with pytest.raises((RuntimeError, AssertionError), match=r"(?i)cuda"):
        main([*args, "-o", str(tmp_path / "x.png")])
