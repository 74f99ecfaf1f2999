"""Speed: s/image, it/s and peak VRAM of bench_pipeline's timed calls on the served pipeline; the first run against
diffusers' ``StableDiffusionPipeline`` on the same components, interleaved (target ratio <= 1.03, equal images)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from acceptance.context import Context, gib
from acceptance.runner import Step, StepResult


def step_speed(ctx: Context, result: StepResult) -> None:
    """bench_pipeline's timed calls on the served pipeline; the first run against diffusers, interleaved."""
    from bench_pipeline import Timings, bench_steps, run_once
    from diffusers import StableDiffusionPipeline

    from jsd.schedulers import make_scheduler

    pipe = ctx.pipeline()
    original = pipe.scheduler
    base_config = dict(original.config)
    runs = []
    try:
        for index, (scheduler, steps, batch, repeats) in enumerate(ctx.plan.speed_runs):
            pipe.scheduler = make_scheduler(scheduler, base_config)
            args = bench_args(ctx, batch, repeats)
            if index == 0:
                reference = StableDiffusionPipeline(**pipe.components)
                reference.set_progress_bar_config(disable=True)
                arms = bench_steps(pipe, reference, args, steps)
                result.figures["ratio"] = ratio_figures(arms, scheduler, steps, ctx.plan.side, repeats)
                timings = arms["jsd"]
            else:
                run_once("jsd", pipe, None, args, min(2, steps), Timings())  # warm-up: kernels, allocator
                timings = Timings()
                for _ in range(repeats):
                    run_once("jsd", pipe, None, args, steps, timings)
            runs.append(speed_row(scheduler, steps, batch, ctx.plan.side, timings, ctx.cuda))
            print(runs[-1], flush=True)
    finally:
        pipe.scheduler = original
    result.figures["runs"] = runs
    ratio = result.figures["ratio"]
    detail = f"{ratio['ratio']:.3f} (paired {ratio['paired']:.3f})"
    if ctx.cuda:
        result.check("jsd / diffusers ratio <= 1.03", ratio["ratio"] <= 1.03, detail)
    else:  # a few steps of a tiny model on a shared CPU: noise, not the target (and a flaky test if judged)
        result.check("jsd / diffusers ratio <= 1.03", None, f"n/a on CPU (tiny weights, a few steps): {detail}")
    result.check("images equal diffusers'", ratio["max_abs_diff"] <= 1e-3, f"max |diff| {ratio['max_abs_diff']:.1e}")
    if not ctx.cuda:
        result.notes.append("peak VRAM: n/a on CPU; s/image and it/s are of tiny weights on CPU, not GPU figures")


def bench_args(ctx: Context, batch: int, repeats: int) -> argparse.Namespace:
    """The options bench_pipeline's functions read."""
    side = ctx.plan.side
    return argparse.Namespace(
        device=ctx.device, height=side, width=side, batch=batch, repeats=repeats, guidance_scale=7.5
    )


def ratio_figures(arms: dict, scheduler: str, steps: int, side: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    ours, theirs = arms["jsd"], arms["diffusers"]
    diff = np.abs(ours.images.astype(np.float64) - theirs.images.astype(np.float64)).max()
    return {
        "setting": f"{scheduler}, {steps} steps, {side}², 1 image, {repeats} interleaved repeats",
        "jsd_s": round(statistics.median(ours.seconds), 3),
        "diffusers_s": round(statistics.median(theirs.seconds), 3),
        "ratio": round(statistics.median(ours.seconds) / statistics.median(theirs.seconds), 3),
        "paired": round(statistics.median([a / b for a, b in zip(ours.seconds, theirs.seconds, strict=True)]), 3),
        "max_abs_diff": float(diff),
    }


def speed_row(scheduler: str, steps: int, batch: int, side: int, timings, cuda: bool) -> dict[str, Any]:
    return {
        "scheduler": scheduler,
        "steps": steps,
        "size": f"{side}²",
        "num_outputs": batch,
        "s_per_image": round(statistics.median(timings.seconds), 3),
        "it_per_s": round(statistics.median(timings.steps_per_s), 2) if timings.steps_per_s else None,
        "peak_vram_gib": gib(timings.peak_bytes) if cuda else "n/a on CPU",
    }


STEP = Step("speed", "speed: s/image, it/s, peak VRAM; jsd against diffusers", step_speed)
