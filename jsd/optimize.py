"""The serving fast path: prepare a loaded pipeline for its device, once, at start-up.

Called at the edge (the predictor's ``setup()``), after loading. Everything here uses diffusers' and
PyTorch's own switches; nothing replaces a diffusers module:

- weights in the serving dtype: fp16 on CUDA (a T4 has no bf16), fp32 elsewhere. The weights *are*
  fp16 — load them with ``torch_dtype=serving_dtype(device)``; no autocast runs over fp32 weights;
- PyTorch SDPA attention in every model (diffusers' ``AttnProcessor2_0``, transformers' ``"sdpa"``),
  checked and set explicitly, never xformers;
- the UNet in channels_last memory format on CUDA (diffusers' recommendation for convolutions on tensor
  cores); the VAE is left as it is, its speed-up being unmeasured;
- VAE slicing (diffusers decodes a batch one image at a time, only when the batch is > 1) and tiling
  in tiles of ``VAE_TILE_SIZE`` pixels, which diffusers applies only to images with a side larger
  than that; smaller images decode exactly as without tiling;
- ``torch.compile`` of the UNet behind ``JSD_TORCH_COMPILE=1`` (off by default: it costs minutes of
  start-up and recompiles for every new image size or batch);
- a warm-up generation, by default only when compiling (``JSD_WARMUP=1`` forces it): it moves the
  compilation out of the first user's prediction.

The safety checker already runs once on the whole batch in diffusers (``run_safety_checker``); it
is moved to the device and dtype with the rest and needs nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

COMPILE_ENV = "JSD_TORCH_COMPILE"
WARMUP_ENV = "JSD_WARMUP"
# Image side (pixels) above which the VAE decodes in tiles of this size. One 1024×1024 fp16 decode of
# the SD v1 VAE peaks at a few GB (128 channels × 1024² activations at 256 MB each, several alive at
# once), which a 16 GB T4 holds beside the 2.6 GB of fp16 models; larger sides are tiled so that no
# single decode exceeds it. 512–1024 px images, the model's range, are never tiled (no seams).
VAE_TILE_SIZE = 1024
# diffusers' torch.compile recipe for Stable Diffusion (docs: "Accelerate inference of text-to-image
# diffusion models" / "torch.compile"): CUDA graphs, whole-graph capture.
COMPILE_KWARGS = {"mode": "reduce-overhead", "fullgraph": True}
WARMUP_SIZE = 512
WARMUP_STEPS = 2
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class FastPath:
    """What :func:`apply_fast_path` does to a pipeline; :func:`plan_fast_path` builds it for a device."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compile: bool
    warmup: bool
    vae_tile_size: int = VAE_TILE_SIZE


@dataclasses.dataclass
class FastPathReport:
    """What was applied, for the start-up log."""

    device: str
    dtype: str
    attention: dict[str, list[str]]
    channels_last: list[str]
    vae_slicing: bool
    vae_tile_size: int
    compiled: bool
    warmup_s: float | None = None

    def summary(self) -> str:
        attention = ", ".join(f"{name}={'/'.join(kinds)}" for name, kinds in self.attention.items())
        warmup = "none" if self.warmup_s is None else f"{self.warmup_s:.1f} s"
        return (
            f"fast path on {self.device}: {self.dtype}, attention {attention}, channels_last "
            f"{self.channels_last or 'none'}, VAE slicing {'on' if self.vae_slicing else 'off'}, VAE tiles above "
            f"{self.vae_tile_size} px, torch.compile {'on' if self.compiled else 'off'}, warm-up {warmup}"
        )


def serving_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA (a T4 has no bf16), fp32 elsewhere: pass it as ``torch_dtype`` when loading."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """An on/off environment variable; unset or empty is off. Anything unrecognised is an error."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"Environment variable `{name}` is {value!r}; use one of {sorted(_TRUE)} to turn it on "
        f"or {sorted(_FALSE - {''})} (or leave it unset) to turn it off."
    )


def plan_fast_path(
    device: str | torch.device,
    *,
    compile: bool | None = None,
    warmup: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> FastPath:
    """The fast path for ``device``; ``compile``/``warmup`` of ``None`` read ``JSD_TORCH_COMPILE``/``JSD_WARMUP``."""
    device = torch.device(device)
    if compile is None:
        compile = env_flag(COMPILE_ENV, environ)
    if warmup is None:
        # Compiling happens on the first call: warm up then, so the first user does not pay for it.
        warmup = compile or env_flag(WARMUP_ENV, environ)
    return FastPath(
        device=device,
        dtype=serving_dtype(device),
        channels_last=device.type == "cuda",
        compile=compile,
        warmup=warmup,
    )


def optimize_pipeline(
    pipe, device: str | torch.device, *, compile: bool | None = None, warmup: bool | None = None
) -> FastPathReport:
    """Move a loaded Stable Diffusion pipeline to ``device`` and apply the fast path; returns what was done.

    Args:
        pipe: a loaded (Japanese) Stable Diffusion pipeline; ideally loaded with
            ``torch_dtype=serving_dtype(device)`` so that no dtype conversion happens here.
        device: where it serves, e.g. ``"cuda"`` or ``"cpu"``.
        compile: ``torch.compile`` the UNet; ``None`` reads ``JSD_TORCH_COMPILE`` (off when unset).
        warmup: run one small generation now; ``None`` reads ``JSD_WARMUP`` and is on when compiling.
    """
    return apply_fast_path(pipe, plan_fast_path(device, compile=compile, warmup=warmup))


def apply_fast_path(pipe, plan: FastPath) -> FastPathReport:
    """Apply ``plan`` to ``pipe`` (see :func:`plan_fast_path`)."""
    _to_device(pipe, plan)
    attention = use_sdpa(pipe)
    channels_last = []
    if plan.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        channels_last.append("unet")
    configure_vae(pipe.vae, tile_size=plan.vae_tile_size)
    if plan.compile:
        # In place (nn.Module.compile): the pipeline keeps its UNet2DConditionModel, config and all.
        pipe.unet.compile(**COMPILE_KWARGS)
    report = FastPathReport(
        device=str(plan.device),
        dtype=str(plan.dtype).removeprefix("torch."),
        attention=attention,
        channels_last=channels_last,
        vae_slicing=pipe.vae.use_slicing,
        vae_tile_size=plan.vae_tile_size,
        compiled=plan.compile,
    )
    if plan.warmup:
        report.warmup_s = warm_up(pipe)
    logger.info(report.summary())
    return report


def use_sdpa(pipe) -> dict[str, list[str]]:
    """Make every model of ``pipe`` use PyTorch's scaled_dot_product_attention; returns the kinds in use.

    diffusers already defaults to ``AttnProcessor2_0`` and transformers to ``"sdpa"`` with torch 2, but a
    checkpoint, LoRA loader or earlier call may have set another processor (classic or xformers): this
    checks and resets them. (diffusers' ``set_default_attn_processor`` would pick the classic, slower
    ``AttnProcessor``, so it is not used.)
    """
    attention = {}
    for name in ("unet", "vae"):
        model = getattr(pipe, name)
        if not all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values()):
            model.set_attn_processor(AttnProcessor2_0())
        attention[name] = sorted({type(p).__name__ for p in model.attn_processors.values()})
    for name in ("text_encoder", "safety_checker"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        kinds = set()
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and module._supports_sdpa:
                if module.config._attn_implementation != "sdpa":
                    module.set_attn_implementation("sdpa")
                kinds.add(module.config._attn_implementation)
        attention[name] = sorted(kinds)
    return attention


def configure_vae(vae, *, tile_size: int = VAE_TILE_SIZE) -> None:
    """Slice batches and tile images with a side above ``tile_size`` pixels (diffusers' own switches).

    diffusers tiles when a side exceeds ``vae.tile_sample_min_size`` (pixels, encode) or
    ``vae.tile_latent_min_size`` (latents, decode), and then uses tiles of that size; both default to
    the VAE's 512 px, which would tile (and seam) every image above 512 px. Raising them to
    ``tile_size`` keeps every image up to ``tile_size`` per side decoded in one piece.
    """
    if tile_size % vae_scale_factor(vae):
        raise ValueError(f"`tile_size` must be a multiple of {vae_scale_factor(vae)} pixels, got {tile_size}.")
    vae.enable_slicing()
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_size
    vae.tile_latent_min_size = tile_size // vae_scale_factor(vae)


def vae_scale_factor(vae) -> int:
    """Pixels per latent (8 for SD v1), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def warm_up(pipe, *, size: int | None = None, steps: int = WARMUP_STEPS) -> float:
    """One small generation at the default size (``WARMUP_SIZE``: compiles, loads kernels); returns its seconds.

    Uses its own generator, so the global random state is untouched.
    """
    size = size or WARMUP_SIZE
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(0)
    pipe("", num_inference_steps=steps, height=size, width=size, generator=generator, output_type="np")
    _synchronize(pipe.device)
    return time.perf_counter() - start


def _to_device(pipe, plan: FastPath) -> None:
    dtype = pipe.unet.dtype
    if dtype == plan.dtype:
        pipe.to(device=plan.device)
        return
    # Not an error (the library works in any dtype), but it is the slow cold start: load, then copy.
    logger.warning(
        "The pipeline was loaded as %s; converting to %s for %s. Load it with torch_dtype=%s to skip this copy.",
        dtype,
        plan.dtype,
        plan.device,
        plan.dtype,
    )
    pipe.to(device=plan.device, dtype=plan.dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
