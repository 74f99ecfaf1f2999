"""Prompt adherence of a checkpoint on the toy world: draw the canonical captions, read the pictures with the judge."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from jsd.serving import GenerationRequest, ImageGenerator, load_pipeline
from jsd.toyworld import judge, world


def sample_scenes(count: int, *, seed: int, pool: list[world.Scene] | None = None) -> list[world.Scene]:
    """``count`` distinct scenes of ``pool`` (default: the training scenes), the same for the same seed."""
    pool = pool if pool is not None else world.training_scenes()
    return random.Random(seed).sample(pool, min(count, len(pool)))


def draw(
    generator: ImageGenerator,
    scenes: list[world.Scene],
    *,
    steps: int = 25,
    prompts: list[str] | None = None,
    **settings,
) -> list[Image.Image]:
    """One 128×128 picture per scene (its canonical caption unless ``prompts``), picture ``i`` at seed ``i``."""
    prompts = prompts or [scene.prompt() for scene in scenes]
    images = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(
            prompt=prompt, width=128, height=128, num_inference_steps=steps, seed=i, output_format="png", **settings
        )
        images.append(generator.generate(request).images[0].image)
    return images


def adherence(folder: str | Path, scenes: list[world.Scene], *, steps: int = 25) -> dict[str, float]:
    """Per attribute, the share of pictures of ``folder``'s checkpoint that show what the prompt asked for."""
    generator = ImageGenerator(load_pipeline(folder, device="cpu"))
    return {k: round(v, 4) for k, v in judge.agreement(draw(generator, scenes, steps=steps), scenes).items()}


def vae_round_trip(vae, count: int = 96, *, seed: int = 5) -> dict[str, float]:
    """Per attribute, the share of ``count`` fresh pictures of the training scenes that the judge still reads
    right after ``vae`` encodes them (the posterior's mean) and decodes them: what the UNet can draw at best."""
    from diffusers.image_processor import VaeImageProcessor

    rng = random.Random(seed)
    scenes = sample_scenes(count, seed=seed)
    processor = VaeImageProcessor()  # diffusers' own PIL <-> [-1, 1] conversion, as the pipelines use it
    pixels = processor.preprocess([world.render(scene, rng) for scene in scenes])
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(part).latent_dist.mean).sample for part in pixels.split(32)])
    images = processor.postprocess(decoded, output_type="pil")
    return {k: round(v, 4) for k, v in judge.agreement(images, scenes).items()}
