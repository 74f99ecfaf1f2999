"""The components of a fine-tuning run: loaded from a checkpoint, then trained or frozen per stage."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from transformers import CLIPTextModel

from jsd.loading import load_components, load_scheduler
from jsd.tokenizer import JapaneseTokenizer
from jsd.training.config import TrainConfig

FROZEN_OR_TRAINED = ("text_encoder", "unet", "vae")


def load_training_components(folder: Path, config: TrainConfig) -> dict:
    """Tokenizer, text encoder, UNet, VAE and the DDPM noise scheduler of the checkpoint's config.

    The models are loaded in fp32, also from an fp16 served folder (e.g. stage 2 from a stage-1 output):
    training and its frozen parts start from fp32 (``freeze_for_stage`` casts the frozen ones).
    """
    components = load_components(folder, torch_dtype=torch.float32, load_safety_checker=False)
    tokenizer = components["tokenizer"]
    if config.tokenizer_name:
        tokenizer = JapaneseTokenizer.from_pretrained(config.tokenizer_name)
    text_encoder = components["text_encoder"]
    if config.text_encoder_init == "scratch":
        text_encoder = fresh_text_encoder(text_encoder, vocab_size=tokenizer.vocab_size, seed=config.seed)
    elif tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise ValueError(
            f"`--tokenizer_name` {config.tokenizer_name} has {tokenizer.vocab_size} pieces but the text encoder of "
            f"{folder} has {text_encoder.config.vocab_size} embeddings: use `--text_encoder_init scratch`."
        )
    scheduler_config = load_scheduler(folder / "scheduler").config
    overrides = {"prediction_type": config.prediction_type} if config.prediction_type else {}
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": components["unet"],
        "vae": components["vae"],
        "noise_scheduler": DDPMScheduler.from_config(scheduler_config, **overrides),
    }


def fresh_text_encoder(text_encoder: CLIPTextModel, *, vocab_size: int, seed: int) -> CLIPTextModel:
    """A re-initialised ``CLIPTextModel`` of the same architecture (the paper trains it from scratch)."""
    text_config = copy.deepcopy(text_encoder.config)
    text_config.vocab_size = vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(text_config)


def freeze_for_stage(
    components: dict, trained: tuple[str, ...], *, device: torch.device, weight_dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """Set ``requires_grad``/train mode per stage; frozen models go to ``device`` in ``weight_dtype``.

    Returns the trained modules (still fp32, on the CPU: ``accelerator.prepare`` places them).
    """
    for name in FROZEN_OR_TRAINED:
        module = components[name]
        is_trained = name in trained
        module.requires_grad_(is_trained)
        module.train(is_trained)
        if not is_trained:
            module.to(device, dtype=weight_dtype)
    return {name: components[name] for name in trained}
