"""The pipelines are diffusers' pipelines with rinna's text front end: same images, same arguments."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from jsd import (
    JapaneseStableDiffusionImg2ImgPipeline,
    JapaneseStableDiffusionInpaintPipeline,
    JapaneseStableDiffusionPipeline,
)
from jsd.tiny import write_2022_checkpoint

PROMPT, NEGATIVE = "サラリーマン 油絵", "低品質、ぼやけた"
SIZE = 64


@pytest.fixture(scope="module")
def pipe(rinna_checkpoint) -> JapaneseStableDiffusionPipeline:
    return JapaneseStableDiffusionPipeline.from_pretrained(rinna_checkpoint, use_safetensors=True)


def reference_embeds(pipe, text: str) -> torch.Tensor:
    """What rinna's pipeline fed the UNet: direct sentencepiece ids through the text encoder."""
    pieces = [*pipe.tokenizer.sp_model.encode(text.lower())[:76], 2]
    ids = torch.tensor([pieces + [3] * (77 - len(pieces))])
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def run(pipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 3)
    return pipeline(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_txt2img_equals_diffusers_fed_reference_embeddings(pipe):
    ours = run(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE)
    theirs = run(
        StableDiffusionPipeline(**pipe.components),
        prompt_embeds=reference_embeds(pipe, PROMPT),
        negative_prompt_embeds=reference_embeds(pipe, NEGATIVE),
        height=SIZE,
        width=SIZE,
    )
    assert ours.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_img2img_equals_diffusers(pipe):
    init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    ours = run(JapaneseStableDiffusionImg2ImgPipeline(**pipe.components), prompt=PROMPT, image=init, strength=0.7)
    theirs = run(
        StableDiffusionImg2ImgPipeline(**pipe.components),
        prompt_embeds=reference_embeds(pipe, PROMPT),
        negative_prompt_embeds=reference_embeds(pipe, ""),
        image=init,
        strength=0.7,
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_inpaint_with_4_channel_unet_equals_diffusers_and_keeps_unmasked_pixels_close(pipe):
    assert pipe.unet.config.in_channels == 4
    init = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    kwargs = {"image": init, "mask_image": mask, "height": SIZE, "width": SIZE, "num_inference_steps": 4}
    ours = run(JapaneseStableDiffusionInpaintPipeline(**pipe.components), prompt=PROMPT, **kwargs)
    theirs = run(
        StableDiffusionInpaintPipeline(**pipe.components),
        prompt_embeds=reference_embeds(pipe, PROMPT),
        negative_prompt_embeds=reference_embeds(pipe, ""),
        **kwargs,
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_variants_share_the_loaded_models(pipe):
    img2img = JapaneseStableDiffusionImg2ImgPipeline(**pipe.components)
    inpaint = JapaneseStableDiffusionInpaintPipeline(**pipe.components)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "safety_checker"):
        assert getattr(img2img, name) is getattr(pipe, name) is getattr(inpaint, name)


def test_same_seed_same_image_and_batches_of_prompts(pipe):
    a = run(pipe, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2)
    b = run(pipe, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2)
    np.testing.assert_array_equal(a, b)
    batch = run(
        pipe, prompt=[PROMPT, "猫"], negative_prompt=["", "犬"], height=SIZE, width=SIZE, num_images_per_prompt=2
    )
    assert batch.shape == (4, SIZE, SIZE, 3)


def test_mismatched_negative_prompts_are_rejected_with_the_parameter_named(pipe):
    with pytest.raises(ValueError, match="`negative_prompt`"):
        pipe(prompt=[PROMPT, "猫"], negative_prompt=["犬"], num_inference_steps=1, height=SIZE, width=SIZE)
    with pytest.raises(TypeError, match="`negative_prompt`"):
        pipe(prompt=[PROMPT], negative_prompt="犬", num_inference_steps=1, height=SIZE, width=SIZE)


def test_safety_checker_blacks_out_flagged_images(tmp_path, rinna_spiece):
    from jsd.tiny import make_checkpoint

    flagged = JapaneseStableDiffusionPipeline.from_pretrained(
        make_checkpoint(tmp_path / "nsfw", tokenizer_model=rinna_spiece, nsfw="always")
    )
    out = flagged(PROMPT, num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    assert out.nsfw_content_detected == [True]
    assert not out.images.any()


@pytest.mark.parametrize("with_safety_checker", [True, False])
def test_loads_rinnas_2022_layout_and_matches_the_served_one(tmp_path, rinna_checkpoint, pipe, with_safety_checker):
    old = write_2022_checkpoint(rinna_checkpoint, tmp_path / "rinna", with_safety_checker=with_safety_checker)
    legacy = JapaneseStableDiffusionPipeline.from_pretrained(old)
    assert (legacy.safety_checker is None) is not with_safety_checker
    assert legacy.scheduler.config.steps_offset == 1
    kwargs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "num_inference_steps": 2}
    np.testing.assert_allclose(run(legacy, **kwargs), run(pipe, **kwargs), atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"No \.safetensors weights in .*/rinna/text_encoder"):
        JapaneseStableDiffusionPipeline.from_pretrained(old, use_safetensors=True)


def test_served_folders_refuse_pickles_even_when_not_asked(tmp_path, tiny_checkpoint):
    served = shutil.copytree(tiny_checkpoint, tmp_path / "served")
    (served / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, served / "vae" / "diffusion_pytorch_model.bin")  # a pickle slipped into a served folder
    with pytest.raises(FileNotFoundError, match=r"No \.safetensors weights in .*/served/vae"):
        JapaneseStableDiffusionPipeline.from_pretrained(served)


def test_from_pretrained_with_a_hub_repo_id_downloads_with_the_token(monkeypatch, rinna_checkpoint):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(rinna_checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    loaded = JapaneseStableDiffusionPipeline.from_pretrained(
        "rinna/japanese-stable-diffusion", token="hf_secret", revision="main"
    )
    assert calls[0][0] == "rinna/japanese-stable-diffusion"
    assert calls[0][1]["token"] == "hf_secret" and calls[0][1]["revision"] == "main"
    assert loaded.tokenizer.vocab_size == 32000


def test_missing_folder_and_missing_parts_are_named(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JapaneseStableDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="lacks unet/"):
        JapaneseStableDiffusionPipeline.from_pretrained(broken)


def test_save_pretrained_round_trip_gives_the_same_images(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["tokenizer"] == ["jsd", "JapaneseTokenizer"]
    assert not list((tmp_path / "saved").rglob("*.bin"))
    again = JapaneseStableDiffusionPipeline.from_pretrained(tmp_path / "saved", use_safetensors=True)
    kwargs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "num_inference_steps": 2}
    np.testing.assert_array_equal(run(again, **kwargs), run(pipe, **kwargs))
