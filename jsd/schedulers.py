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
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import is_scipy_available


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class and the config values that make it the named sampler."""

    cls: type
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


DEFAULT_SCHEDULER = "DPM-Solver++ 2M"

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


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A new scheduler named ``name``, built from the checkpoint's scheduler config ``base_config``.

    Args:
        name: one of :func:`scheduler_names`, e.g. ``"DPM-Solver++ 2M"`` or ``"Euler ancestral"``.
        base_config: the loaded scheduler's ``config`` (keys other classes do not know are ignored).
    """
    spec = SCHEDULERS[check_scheduler_name(name)]
    return spec.cls.from_config(dict(base_config), **spec.overrides)
