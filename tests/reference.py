"""Independent references for the input tests: diffusers' own pipelines, PIL's own encoders, EXIF-rotated photos.

Nothing here goes through :mod:`jsd.serving` or :mod:`jsd.prompting`: the references take the loaded components
(the tiny checkpoint's) and call diffusers' ``StableDiffusion*Pipeline`` with the same arguments and seeds, so a
user's input that is dropped, defaulted or passed to the wrong parameter on the way shows up as other pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

# The samplers users pick by name, written out from diffusers' docs (not read from jsd.schedulers).
SCHEDULERS = {
    "DPM-Solver++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler ancestral": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {"clip_sample": False}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}
EXIF_ORIENTATION = 0x0112


def diffusers_images(
    components: dict,
    *,
    scheduler: str,
    seeds: list[int],
    image: Image.Image | None = None,
    mask_image: Image.Image | None = None,
    lora: Path | None = None,
    lora_scale: float = 1.0,
    **kwargs,
) -> list[np.ndarray]:
    """diffusers' txt2img / img2img / inpaint pipeline on ``components`` (no safety checker), as uint8 arrays.

    ``kwargs`` go to the pipeline call as they are (``prompt``/``prompt_embeds``, ``guidance_scale``, ...);
    image ``i`` gets its own CPU generator seeded ``seeds[i]``. ``lora``: a ``lora.safetensors`` loaded with
    diffusers' ``load_lora_weights`` and applied at ``lora_scale`` (then unloaded again).
    """
    cls, overrides = SCHEDULERS[scheduler]
    scheduler_config = components["scheduler"].config
    parts = dict(components) | {"safety_checker": None, "scheduler": cls.from_config(scheduler_config, **overrides)}
    if image is None:
        pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    elif mask_image is None:
        pipe = StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False)
        kwargs["image"] = image
    else:
        pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
        kwargs |= {"image": image, "mask_image": mask_image}
    if lora is not None:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name)
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    try:
        out = pipe(
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            num_images_per_prompt=len(seeds),
            **kwargs,
        )
    finally:
        if lora is not None:
            pipe.unload_lora_weights()
    return [np.asarray(im).astype(np.int16) for im in out.images]


def weighted_embeds(components: dict, text: str, weight: float) -> torch.Tensor:
    """The embeddings of ``(text:weight)``: every piece of ``text`` weighted (A1111: multiply, restore the mean)."""
    tokenizer = components["tokenizer"]
    pieces = tokenizer.sp_model.encode(text.lower())[:76]
    ids = [*pieces, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (76 - len(pieces))
    with torch.no_grad():
        hidden = components["text_encoder"](torch.tensor([ids]))[0]
    weights = torch.tensor([weight] * len(pieces) + [1.0] * (77 - len(pieces)))[None, :, None]
    weighted = hidden * weights
    # A1111 restores the mean; jsd.prompting documents that a mean within 1% of the mean |value| (the tiny
    # text encoder's final layer norm gives about 1e-8) is noise, and only multiplies then.
    if min(hidden.mean().abs() / hidden.abs().mean(), weighted.mean().abs() / weighted.abs().mean()) <= 0.01:
        return weighted
    return weighted * (hidden.mean() / weighted.mean())


def read_pixels(path: str | Path | bytes) -> np.ndarray:
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def pil_encoded(pixels: np.ndarray, fmt: str, quality: int) -> np.ndarray:
    """``pixels`` through PIL's own encoder (``fmt`` WEBP or JPEG at ``quality``) and back."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, fmt, quality=quality)
    return read_pixels(buffer.getvalue())


def phone_photo(path: Path, upright: Image.Image) -> Image.Image:
    """Save ``upright`` as a phone does: the sensor's pixels (turned 90° left) and EXIF Orientation 6.

    Returns what a viewer shows: the saved pixels decoded and turned back by hand (Orientation 6 means
    "rotate 90° clockwise to display"), so the reference does not depend on PIL's ``exif_transpose``.
    """
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (upright.height, upright.width)
        return stored.transpose(Image.Transpose.ROTATE_270).convert(upright.mode)


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (smooth: a JPEG keeps it, and rotating it visibly changes it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the left third and a top strip, black (keep) elsewhere: not symmetric under rotation."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 3, height))
    mask.paste(255, (0, 0, width, height // 4))
    return mask
