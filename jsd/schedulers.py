"""Schedulers by name: the names users pick (Cog's ``scheduler`` input, the CLI) mapped to diffusers classes.

Every scheduler is built from the checkpoint's own scheduler config (betas, ``steps_offset`` …) with
``SchedulerClass.from_config(base_config, **overrides)``, as diffusers' docs show for swapping
schedulers. Build a fresh one for every generation: schedulers keep per-run state (step index,
previous model outputs), so sharing one between requests can leak state from one into the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import is_scipy_available


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, the config values that make it the named sampler, and its call settings.

    ``call_kwargs`` go to the pipeline call with this scheduler: diffusers' Stable Diffusion pipelines pass
    their own ``eta`` (default 0.0) to every scheduler whose ``step`` takes one, so TCD's ``eta`` must be
    given there, as diffusers' TCD docs do (``pipe(..., eta=0.3)``). ``max_steps``: the most
    ``num_inference_steps`` the scheduler accepts (LCM and TCD pick their steps among
    ``original_inference_steps`` = 50 and raise beyond it).
    """

    cls: type
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    max_steps: int | None = None


DEFAULT_SCHEDULER = "DPM-Solver++ 2M"
# TCD's gamma (called eta in diffusers): 0.3 is the TCD card's and TCDScheduler.step's default; fixed, not an input.
TCD_ETA = 0.3
LCM_ORIGINAL_STEPS = 50  # LCMScheduler/TCDScheduler's default original_inference_steps

SCHEDULERS: dict[str, SchedulerSpec] = {
    "DPM-Solver++ 2M": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "fast and sharp at 20-30 steps (the default)",
    ),
    "DPM-Solver++ 2M Karras": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM-Solver++ 2M with Karras noise levels",
    ),
    "DDIM": SchedulerSpec(DDIMScheduler, {"clip_sample": False}, "deterministic; SD v1's DDIM settings"),
    "PNDM": SchedulerSpec(PNDMScheduler, {"skip_prk_steps": True}, "the checkpoint's own scheduler"),
    "LMS": SchedulerSpec(LMSDiscreteScheduler, {}, "rinna's README default (50 steps)"),
    "Euler": SchedulerSpec(EulerDiscreteScheduler, {}, ""),
    "Euler ancestral": SchedulerSpec(EulerAncestralDiscreteScheduler, {}, "adds fresh noise every step"),
    "Heun": SchedulerSpec(HeunDiscreteScheduler, {}, "two UNet evaluations per step"),
    "UniPC": SchedulerSpec(UniPCMultistepScheduler, {}, "fast at 10-20 steps"),
    "DEIS": SchedulerSpec(DEISMultistepScheduler, {}, ""),
    # Few-step samplers of the acceleration LoRAs (jsd.fast_mode), as their cards and diffusers' docs build them:
    # LCMScheduler/TCDScheduler.from_config(pipe.scheduler.config) and Hyper-SD's DDIM with trailing timesteps.
    "LCM": SchedulerSpec(LCMScheduler, {}, "LCM-LoRA's sampler: 2-8 steps, guidance 1-2", max_steps=LCM_ORIGINAL_STEPS),
    "TCD": SchedulerSpec(
        TCDScheduler,
        {},
        f"TCD-LoRA's sampler, eta {TCD_ETA} (stochasticity; the card's default): 2-8 steps",
        call_kwargs={"eta": TCD_ETA},
        max_steps=LCM_ORIGINAL_STEPS,
    ),
    "DDIM trailing": SchedulerSpec(
        DDIMScheduler,
        {"clip_sample": False, "timestep_spacing": "trailing"},
        "DDIM with trailing timesteps (Hyper-SD's LoRAs); starts from the last training timestep",
    ),
}


def scheduler_names() -> list[str]:
    """The names :func:`make_scheduler` accepts, the default first."""
    return list(SCHEDULERS)


def check_scheduler_name(name: object) -> str:
    """``name`` if it is a known scheduler, else a ``ValueError`` that lists the allowed names."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        got = repr(name) if len(repr(name)) <= 80 else f"{repr(name)[:80]}… ({len(repr(name)):,} characters)"
        raise ValueError(f"`scheduler` must be one of {', '.join(map(repr, SCHEDULERS))}; got {got}.")
    if SCHEDULERS[name].cls is LMSDiscreteScheduler and not is_scipy_available():
        # diffusers' LMS integrates its coefficients with scipy; fail before any model work.
        raise ValueError("`scheduler` 'LMS' needs scipy: pip install 'jsd[serve]' (or scipy==1.17.1).")
    return name


def check_scheduler_steps(name: str, num_inference_steps: int) -> None:
    """``ValueError`` naming both inputs when ``name`` cannot take ``num_inference_steps`` steps."""
    limit = SCHEDULERS[check_scheduler_name(name)].max_steps
    if limit is not None and num_inference_steps > limit:
        raise ValueError(
            f"`num_inference_steps` must be at most {limit} with `scheduler` {name!r} (it picks its steps among "
            f"{limit} of the 1,000 training steps), got {num_inference_steps}."
        )


def scheduler_call_kwargs(name: str) -> dict[str, Any]:
    """What the pipeline call needs with scheduler ``name`` (TCD: ``{"eta": 0.3}``; most: nothing)."""
    return dict(SCHEDULERS[check_scheduler_name(name)].call_kwargs)


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A new scheduler named ``name``, built from the checkpoint's scheduler config ``base_config``.

    Args:
        name: one of :func:`scheduler_names`, e.g. ``"DPM-Solver++ 2M"`` or ``"Euler ancestral"``.
        base_config: the loaded scheduler's ``config`` (keys other classes do not know are ignored).
    """
    spec = SCHEDULERS[check_scheduler_name(name)]
    return spec.cls.from_config(dict(base_config), **spec.overrides)
