"""The loss of one batch: latent diffusion noise prediction (epsilon or v), with caption dropout.

Every random draw goes through one ``torch.Generator`` whose state is saved in each checkpoint, so a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from jsd.tokenizer import JapaneseTokenizer


def tokenize(tokenizer: JapaneseTokenizer, texts: list[str]) -> torch.Tensor:
    """rinna's ids: ``(len(texts), 77)``, ``</s>`` then ``[PAD]``."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def drop_captions(texts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with ``probability``: the unconditional branch of classifier-free guidance."""
    draws = torch.rand(len(texts), generator=generator, device=generator.device).tolist()
    return ["" if draw < probability else text for text, draw in zip(texts, draws, strict=True)]


class LatentCache:
    """The VAE's latent distribution of every picture already drawn, keyed by its pixels (``--cache_latents``).

    As diffusers' ``--cache_latents`` (train_dreambooth_lora_sdxl.py): each picture, and each flip of it, is
    encoded once per run instead of at every step. Its posterior is still sampled with the run's generator at
    every step, so a run draws the same latents with the cache as without it. Kept on the VAE's device:
    ``2 × latent_channels × (resolution / 8)²`` numbers per picture (8 KB at 128 px, 130 KB at 512 px in fp32).
    """

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.parameters: dict[bytes, torch.Tensor] = {}  # pixels' digest -> the posterior's mean and log-variance

    def __len__(self) -> int:
        return len(self.parameters)

    def posterior(self, pixel_values: torch.Tensor) -> DiagonalGaussianDistribution:
        keys = [hashlib.blake2b(p.detach().cpu().numpy().tobytes(), digest_size=16).digest() for p in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self.parameters]
        if missing:
            with torch.no_grad():
                encoded = self.vae.encode(pixel_values[missing].to(_dtype(self.vae))).latent_dist.parameters
            self.parameters |= {keys[i]: parameters for i, parameters in zip(missing, encoded, strict=True)}
        return DiagonalGaussianDistribution(torch.stack([self.parameters[key] for key in keys]))


def posterior(vae: AutoencoderKL, pixel_values: torch.Tensor, cache: LatentCache | None = None):
    """The frozen VAE's latent distribution of ``pixel_values`` (from ``cache`` when the run keeps one)."""
    if cache is not None:
        return cache.posterior(pixel_values)
    with torch.no_grad():
        return vae.encode(pixel_values.to(_dtype(vae))).latent_dist


def diffusion_loss(
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    latent_cache: LatentCache | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the target its scheduler config asks for.

    ``pixel_values`` in [-1, 1] on the training device; the VAE is frozen (no graph is kept for it),
    gradients reach whichever of ``text_encoder`` and ``unet`` require them. ``snr_gamma``: each
    sample's MSE weighted by Min-SNR (:func:`min_snr_weights`). ``latent_cache``: :class:`LatentCache`.
    """
    with torch.no_grad():
        latents = posterior(vae, pixel_values, latent_cache).sample(generator=generator) * vae.config.scaling_factor
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device
    )
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Scheduler `prediction_type`={prediction_type!r}: use 'epsilon' or 'v_prediction'.")
    unet_dtype = _dtype(unet)  # a frozen UNet (stage 1) is stored in the mixed-precision dtype
    hidden = encoder_hidden_states.to(unet_dtype)
    model_pred = unet(noisy_latents.to(unet_dtype), timesteps, hidden, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample: ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for v.

    As diffusers' examples/text_to_image/train_text_to_image.py (``--snr_gamma``): the easy, almost noise-free
    timesteps stop dominating the gradient, and a model learns what the noisy ones decide (layout, color) sooner.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _dtype(module: torch.nn.Module) -> torch.dtype:
    # works for DDP-wrapped modules too, which have no ``.dtype``
    return next(module.parameters()).dtype
