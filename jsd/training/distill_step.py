"""The loss of one batch of latent consistency distillation (LCM-LoRA), beside :mod:`jsd.training.step`.

The recipe of diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``
(huggingface/diffusers, read at 58eb52c), steps 2-10 of its training loop, for JSD's UNet and Japanese
text encoder:

1. latents of the batch; a solver index n per example, ``t_start = ddim_timesteps[n]`` and
   ``t = t_start - k`` (k = ``num_train_timesteps // num_ddim_timesteps``, clamped at 0);
2. ``z = add_noise(latents, noise, t_start)``; a guidance scale w per example, uniform in [w_min, w_max];
3. the student (the UNet with its LoRA): ``c_skip(t_start) z + c_out(t_start) x0(z, t_start)``;
4. the teacher (the same UNet with the LoRA disabled: the LoRA recipe keeps no second copy), conditional
   and unconditional, combined in LCM's form ``cond + w (cond - uncond)``, one DDIM step to ``x_prev``;
5. the target: the student itself (no gradient; no separate target network in the LoRA recipe) at
   ``(x_prev, t)``: ``c_skip(t) x_prev + c_out(t) x0(x_prev, t)``;
6. L2 or pseudo-Huber ``mean(sqrt((pred - target)^2 + c^2) - c)``.

Every draw (VAE sample, n, noise, w) comes from the run's checkpointed ``torch.Generator``, so a resumed run
draws what the uninterrupted one would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from jsd.training.step import LatentCache, _dtype, posterior


class DDIMSolver:
    """diffusers' ``DDIMSolver`` (same file): the timesteps ``[k-1, 2k-1, …, T-1]`` and one DDIM step between them."""

    def __init__(self, alphas_cumprod: torch.Tensor, *, num_train_timesteps: int, num_ddim_timesteps: int) -> None:
        step_ratio = num_train_timesteps // num_ddim_timesteps
        self.ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * step_ratio - 1
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]]).float()
        self.step_ratio = step_ratio

    def to(self, device: torch.device | str) -> DDIMSolver:
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.alphas_cumprod_prev = self.alphas_cumprod_prev.to(device)
        return self

    def ddim_step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The point one solver step earlier: ``sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` (eta 0)."""
        alpha_prev = _per_example(self.alphas_cumprod_prev[index], pred_x0)
        return alpha_prev.sqrt() * pred_x0 + (1.0 - alpha_prev).sqrt() * pred_noise


def make_solver(noise_scheduler: DDPMScheduler, num_ddim_timesteps: int) -> DDIMSolver:
    return DDIMSolver(
        noise_scheduler.alphas_cumprod,
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        num_ddim_timesteps=num_ddim_timesteps,
    )


def scalings_for_boundary_conditions(
    timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip``, ``c_out`` of LCMScheduler.get_scalings_for_boundary_condition_discrete: x0 at t = 0."""
    scaled = timestep_scaling * timestep.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_x0_and_noise(
    model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, noise_scheduler: DDPMScheduler
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from the UNet's output, for the scheduler config's prediction type (epsilon or v)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(sample.device)[timesteps]
    alpha = _per_example(alphas_cumprod.sqrt(), sample)
    sigma = _per_example((1.0 - alphas_cumprod).sqrt(), sample)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    raise ValueError(f"Scheduler `prediction_type`={prediction_type!r}: use 'epsilon' or 'v_prediction'.")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Mean L2, or LCM-LoRA's pseudo-Huber ``sqrt(d^2 + c^2) - c``."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    if loss_type == "huber":
        return torch.mean(torch.sqrt(diff**2 + huber_c**2) - huber_c)
    raise ValueError(f"`--loss_type`={loss_type!r}: use 'l2' or 'huber'.")


def distillation_loss(
    *,
    unet: torch.nn.Module,
    lora_unet: torch.nn.Module,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    solver: DDIMSolver,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    uncond_ids: torch.Tensor,
    generator: torch.Generator,
    w_min: float,
    w_max: float,
    loss_type: str,
    huber_c: float,
    timestep_scaling: float,
    latent_cache: LatentCache | None = None,
) -> torch.Tensor:
    """The consistency distillation loss of one batch (steps in the module docstring).

    ``unet`` is the trained UNet as the optimizer sees it (possibly DDP-wrapped): the student's pass goes
    through it. ``lora_unet`` is the same module unwrapped: its adapters are switched off for the teacher's
    passes, and it gives the target, both without a graph. The VAE and text encoder are frozen.
    """
    with torch.no_grad():
        latents = posterior(vae, pixel_values, latent_cache).sample(generator=generator) * vae.config.scaling_factor
        latents = latents.float()
        cond = text_encoder(input_ids, return_dict=False)[0]
        uncond = text_encoder(uncond_ids, return_dict=False)[0]
    device, bsz = latents.device, latents.shape[0]
    index = torch.randint(0, len(solver.ddim_timesteps), (bsz,), generator=generator, device=device)
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = (start_timesteps - solver.step_ratio).clamp(min=0)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    w = torch.rand(bsz, generator=generator, device=device) * (w_max - w_min) + w_min
    w = _per_example(w, latents)
    noisy = noise_scheduler.add_noise(latents, noise, start_timesteps)

    unet_dtype = _dtype(lora_unet)  # the frozen base weights' dtype (the adapters stay fp32)
    c_skip_start, c_out_start = (_per_example(c, latents) for c in scalings_for_boundary_conditions(
        start_timesteps, timestep_scaling=timestep_scaling
    ))  # fmt: skip
    student_out = unet(noisy.to(unet_dtype), start_timesteps, cond.to(unet_dtype), return_dict=False)[0].float()
    student_x0, _ = predicted_x0_and_noise(student_out, start_timesteps, noisy, noise_scheduler)
    model_pred = c_skip_start * noisy + c_out_start * student_x0

    with torch.no_grad():
        x_prev = teacher_ddim_step(lora_unet, noisy, start_timesteps, index, cond, uncond, w, noise_scheduler, solver)
        target_out = lora_unet(x_prev.to(unet_dtype), timesteps, cond.to(unet_dtype), return_dict=False)[0].float()
        target_x0, _ = predicted_x0_and_noise(target_out, timesteps, x_prev, noise_scheduler)
        c_skip, c_out = (_per_example(c, latents) for c in scalings_for_boundary_conditions(
            timesteps, timestep_scaling=timestep_scaling
        ))  # fmt: skip
        target = c_skip * x_prev + c_out * target_x0
    return consistency_loss(model_pred, target, loss_type, huber_c)


def teacher_ddim_step(lora_unet, noisy, start_timesteps, index, cond, uncond, w, noise_scheduler, solver):
    """The teacher's classifier-free-guided DDIM step from ``noisy`` (the UNet with its LoRA switched off)."""
    unet_dtype = _dtype(lora_unet)
    lora_unet.disable_adapters()  # diffusers' PeftAdapterMixin; enable_adapters restores requires_grad too
    try:
        both = torch.cat([cond, uncond]).to(unet_dtype)
        out = lora_unet(
            torch.cat([noisy, noisy]).to(unet_dtype), torch.cat([start_timesteps, start_timesteps]), both,
            return_dict=False,
        )[0].float()  # fmt: skip
    finally:
        lora_unet.enable_adapters()
    x0, eps = predicted_x0_and_noise(out, torch.cat([start_timesteps, start_timesteps]), torch.cat([noisy, noisy]),
                                     noise_scheduler)  # fmt: skip
    (cond_x0, uncond_x0), (cond_eps, uncond_eps) = x0.chunk(2), eps.chunk(2)
    pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)  # LCM's CFG form: the teacher's guidance scale is 1 + w
    pred_noise = cond_eps + w * (cond_eps - uncond_eps)
    return solver.ddim_step(pred_x0, pred_noise, index)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` → ``(batch, 1, 1, 1)`` in ``like``'s dtype, for broadcasting over latents."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
