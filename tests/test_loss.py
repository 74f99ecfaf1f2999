"""The training loss against an independent computation on a fixed batch (jsd.training.step.diffusion_loss).

The reference below follows the DDPM forward process from the scheduler's betas by hand, not through
diffusers' ``add_noise``/``get_velocity``: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, and the target is ε for
``epsilon`` and v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0 for ``v_prediction`` (Salimans & Ho 2022, eq. 9).
It draws its random numbers in the loss's documented order from the same seed: the VAE posterior
sample, the noise, the timesteps.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from jsd.loading import load_components, load_scheduler
from jsd.training.step import LatentCache, diffusion_loss, tokenize

SEED = 7
GAMMA = 0.001


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    components = load_components(tiny_checkpoint, torch_dtype=torch.float32, load_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        components[name].eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    input_ids = tokenize(components["tokenizer"], ["赤い花の写真", "海辺の夕日"])
    config = load_scheduler(tiny_checkpoint / "scheduler").config
    return components, pixels, input_ids, config


def reference_loss(
    components, pixels, input_ids, scheduler: DDPMScheduler, prediction_type: str, snr_gamma: float | None = None
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        latents = components["vae"].encode(pixels).latent_dist.sample(generator=generator) * 0.18215
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
        alpha_bar = torch.cumprod(1 - betas, dim=0)[timesteps].float().view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        target = {"epsilon": noise, "v_prediction": velocity}[prediction_type]
        hidden = components["text_encoder"](input_ids)[0]
        prediction = components["unet"](noisy, timesteps, hidden).sample
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        if snr_gamma is None:
            return per_sample.mean()
        # Min-SNR-gamma (Hang et al. 2023, eq. 10 and its v form): min(SNR, γ)/SNR, SNR = ᾱ/(1-ᾱ)
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        divisor = snr + 1 if prediction_type == "v_prediction" else snr
        return (per_sample * torch.minimum(snr, torch.tensor(snr_gamma)) / divisor).mean()


def loss_of(
    parts, scheduler: DDPMScheduler, snr_gamma: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """jsd.training's loss on the fixed batch, with the fixed noise seed unless ``generator`` is given."""
    components, pixels, input_ids, _ = parts
    return diffusion_loss(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        noise_scheduler=scheduler,
        pixel_values=pixels,
        input_ids=input_ids,
        generator=generator or torch.Generator().manual_seed(SEED),
        snr_gamma=snr_gamma,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_an_independent_computation_on_a_fixed_batch(parts, prediction_type):
    components, pixels, input_ids, config = parts
    scheduler = DDPMScheduler.from_config(config, prediction_type=prediction_type)
    assert (scheduler.config.beta_schedule, scheduler.config.num_train_timesteps) == ("scaled_linear", 1000)
    with torch.no_grad():
        loss = loss_of(parts, scheduler)
    expected = reference_loss(components, pixels, input_ids, scheduler, prediction_type)
    other_type = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    other = reference_loss(components, pixels, input_ids, scheduler, other_type)
    assert abs(expected.item() - other.item()) > 1e-3  # the batch tells the two targets apart
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_an_unknown_prediction_type_is_refused(parts):
    config = parts[3]
    scheduler = DDPMScheduler.from_config(config, prediction_type="sample")
    with pytest.raises(ValueError, match=r"`prediction_type`='sample'"):
        loss_of(parts, scheduler)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_equals_an_independent_computation(parts, prediction_type):
    components, pixels, input_ids, config = parts
    scheduler = DDPMScheduler.from_config(config, prediction_type=prediction_type)
    with torch.no_grad():
        # γ below every SNR of the schedule (its last is 0.0047): each timestep of the batch is reweighted
        weighted = loss_of(parts, scheduler, snr_gamma=GAMMA)
        plain = loss_of(parts, scheduler)
    expected = reference_loss(components, pixels, input_ids, scheduler, prediction_type, snr_gamma=GAMMA)
    assert abs(weighted.item() - plain.item()) > 1e-3 * plain.item()  # the weighting changes this batch's loss
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)


def test_the_trainer_weights_its_loss_by_snr_gamma(parts):
    """``--snr_gamma`` reaches the loss of every training step (trainer.batch_loss)."""
    from types import SimpleNamespace

    from jsd.training.config import parse_config
    from jsd.training.trainer import batch_loss

    components, pixels, input_ids, config = parts
    assert torch.equal(input_ids, tokenize(components["tokenizer"], ["赤い花の写真", "海辺の夕日"]))
    components = dict(components, noise_scheduler=DDPMScheduler.from_config(config))
    batch = {"text": ["赤い花の写真", "海辺の夕日"], "pixel_values": pixels}
    accelerator = SimpleNamespace(device=torch.device("cpu"))

    def step_loss(*flags: str) -> float:
        settings = parse_config(["--pretrained_model_name_or_path", "x", "--train_data_dir", "x", *flags])
        with torch.no_grad():
            return batch_loss(accelerator, settings, components, batch, torch.Generator().manual_seed(SEED)).item()

    plain = step_loss("--caption_dropout", "0")
    weighted = step_loss("--caption_dropout", "0", "--snr_gamma", str(GAMMA))
    generator = torch.Generator().manual_seed(SEED)
    torch.rand(2, generator=generator)  # batch_loss draws its caption dropout first
    with torch.no_grad():  # the fixed batch's captions are the ones of ``batch``
        expected = loss_of(parts, components["noise_scheduler"], GAMMA, generator).item()
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert abs(weighted - plain) > 1e-3 * plain


def test_the_latent_cache_draws_the_same_latents_and_encodes_each_picture_once(parts):
    """``--cache_latents``' cache: a picture seen again is not encoded again, and the latents sampled from the
    cached posterior with a generator are those the VAE's own posterior gives with the same generator."""
    components, pixels, _, _ = parts
    vae = components["vae"]
    calls = []
    cache = LatentCache(vae)
    encode = vae.encode
    vae.encode = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    try:
        first = cache.posterior(pixels[:1]).sample(generator=torch.Generator().manual_seed(SEED))
        both = cache.posterior(pixels).sample(generator=torch.Generator().manual_seed(SEED))
        again = cache.posterior(pixels.flip(0)).sample(generator=torch.Generator().manual_seed(SEED))
    finally:
        del vae.encode
    assert calls == [1, 1] and len(cache) == 2  # the second picture once, the first never again
    with torch.no_grad():
        direct = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(SEED))
        flipped = vae.encode(pixels.flip(0)).latent_dist.sample(generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(both, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, flipped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, direct[:1], rtol=1e-5, atol=1e-6)
