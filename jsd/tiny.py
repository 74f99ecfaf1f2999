"""Seeded checkpoints in the exact served layout, tiny or full-size, for tests, the demo and benchmarks.

The real weights are gated on the hub and never on a CI machine; these checkpoints have the same
folders, files and classes as the served Japanese Stable Diffusion, with random weights. ``size="full"``
uses SD v1's real shapes (about 1.1 B parameters: for benchmarks only).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel

from jsd.manifest import write_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.tokenizer import JapaneseTokenizer
from jsd.tokenizer_training import train_sentencepiece

Size = Literal["tiny", "full"]
TINY_VOCAB_SIZE = 2000
# The start of the manifest `source` of every checkpoint made here: how scripts tell it from real weights.
TINY_SOURCE_PREFIX = "jsd.tiny"
# NSFW thresholds: cosine similarity minus threshold > 0 flags, and cosine is within [-1, 1].
_THRESHOLDS = {"never": 2.0, "always": -2.0}


def corpus_lines() -> list[str]:
    """The project's own Japanese text (``jsd/data/corpus_ja.txt``), used to train the tiny tokenizer."""
    text = resources.files("jsd").joinpath("data/corpus_ja.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def unet_config(size: Size, cross_attention_dim: int) -> dict:
    common = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": cross_attention_dim}
    if size == "full":
        return common | {
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "attention_head_dim": 8,
        }
    return common | {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": 4,
    }


def vae_config(size: Size) -> dict:
    """Four blocks in both sizes, so latents are 1/8 of the image as in SD v1."""
    channels, groups = ((128, 256, 512, 512), 32) if size == "full" else ((8, 16, 16, 16), 8)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": channels,
        "layers_per_block": 2 if size == "full" else 1,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def text_encoder_config(size: Size, vocab_size: int) -> CLIPTextConfig:
    dims = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    if size == "tiny":
        dims = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=dims["hidden_size"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **dims,
    )


def safety_checker_config(size: Size) -> tuple[CLIPConfig, int]:
    """CompVis' checker is a CLIP ViT-L/14 at 224 px; the tiny one a 1-layer ViT at 32 px."""
    if size == "full":
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
        vision |= {"num_attention_heads": 16, "patch_size": 14, "image_size": 224}
        return CLIPConfig(vision_config=vision, projection_dim=768), 224
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"patch_size": 8, "image_size": 32}
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=16), 32


def set_nsfw_flagging(safety_checker: StableDiffusionSafetyChecker, mode: Literal["never", "always"]) -> None:
    """Make a safety checker flag every image or none (its thresholds, not its embeddings)."""
    with torch.no_grad():
        safety_checker.concept_embeds_weights.fill_(_THRESHOLDS[mode])
        safety_checker.special_care_embeds_weights.fill_(_THRESHOLDS[mode])


def build_pipeline(
    tokenizer: JapaneseTokenizer, *, size: Size = "tiny", seed: int = 0, nsfw: Literal["never", "always"] = "never"
) -> JapaneseStableDiffusionPipeline:
    """A pipeline with seeded random weights; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        text_config = text_encoder_config(size, tokenizer.vocab_size)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size, text_config.hidden_size))
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(size))
        checker_config, crop = safety_checker_config(size)
        torch.manual_seed(seed)
        safety_checker = StableDiffusionSafetyChecker(checker_config)
        safety_checker.concept_embeds.normal_()
        safety_checker.special_care_embeds.normal_()
    set_nsfw_flagging(safety_checker, nsfw)
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return JapaneseStableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=safety_checker.eval(),
        feature_extractor=feature_extractor,
    )


def make_checkpoint(
    dest: str | Path,
    *,
    tokenizer_model: str | Path | None = None,
    size: Size = "tiny",
    seed: int = 0,
    nsfw: Literal["never", "always"] = "never",
    torch_dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a seeded checkpoint in the served layout (safetensors + manifest) to ``dest``.

    Args:
        tokenizer_model: a sentencepiece model (e.g. rinna's ``google_sp.model``); by default a
            small one is trained on the project's own Japanese corpus.
        torch_dtype: dtype of the saved weights (the served layout uses fp16 for real weights).
    """
    dest = Path(dest)
    tokenizer_dir = dest / "tokenizer"
    if tokenizer_model is None:
        tokenizer = train_sentencepiece(corpus_lines(), tokenizer_dir, vocab_size=TINY_VOCAB_SIZE)
    else:
        tokenizer = JapaneseTokenizer(tokenizer_model)
    pipe = build_pipeline(tokenizer, size=size, seed=seed, nsfw=nsfw)
    if torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    pipe.save_pretrained(dest, safe_serialization=True)
    write_manifest(
        dest, source=f"{TINY_SOURCE_PREFIX} size={size} seed={seed} nsfw={nsfw}", revision=f"{size}-seed{seed}"
    )
    return dest
