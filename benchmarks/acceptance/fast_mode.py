"""Fast mode (issue 23): s/image at 4 ``LCMScheduler`` steps with an LCM-LoRA against the served 25 steps, side
by side; with real weights, a Japanese CLIP and ``--fast-lora``, the held-out prompts paired, 4 fast steps against
25 (``jsd evaluate --compare``)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

from acceptance.clip_score import find_scorer
from acceptance.context import Context, synchronize
from acceptance.plan import PROMPT, REPO
from acceptance.runner import Step, StepResult

FAST_STEPS, FAST_GUIDANCE = 4, 1.0  # diffusers' LCM-LoRA settings: LCMScheduler, 4 steps, guidance 1
BASE_GUIDANCE = 7.5  # the served default (with plan.fast_base_steps, 25 on a GPU)
FAST_GOAL_T4_S = 0.5  # issue 23's goal: at most 0.5 s per 512² image at 4 steps on a T4
FAST_PROBE_RANK = 64  # LCM-LoRA's rank (latent-consistency/lcm-lora-sdv1-5; diffusers' --lora_rank default)


def step_fast_mode(ctx: Context, result: StepResult) -> None:
    """s/image at 4 LCM steps with an LCM-LoRA against 25 steps; with real weights, the paired held-out scores."""
    from jsd.lora_weights import LoraFile, load_lora, unload_lora

    pipe = ctx.pipeline()
    lora_path = ctx.args.fast_lora or random_fast_lora(pipe, ctx.workdir / "fast-lora")
    arms = {"base": [], "fast": []}
    original = pipe.scheduler
    try:
        load_lora(pipe, LoraFile(lora_path, "", str(lora_path)), name="--fast-lora")
        warm_up = 1 if ctx.cuda else 0  # on CUDA the first call of each arm (kernels, allocator) is not timed
        for repeat in range(ctx.plan.fast_repeats + warm_up):
            for arm in ("base", "fast") if repeat % 2 == 0 else ("fast", "base"):
                seconds = fast_mode_call(ctx, pipe, original, arm == "fast")
                if repeat >= warm_up:
                    arms[arm].append(seconds)
    finally:
        unload_lora(pipe)
        pipe.scheduler = original
    fast_s, base_s = statistics.median(arms["fast"]), statistics.median(arms["base"])
    side = ctx.plan.side
    result.figures["fast_mode"] = {
        "setting": f"{side}², 1 image, {ctx.plan.fast_repeats} interleaved repeats",
        "lora": str(lora_path) if ctx.args.fast_lora else f"random, LCM-LoRA's shape (rank {FAST_PROBE_RANK})",
        "fast_s": round(fast_s, 3),
        "fast": f"LCM, {FAST_STEPS} steps, guidance {FAST_GUIDANCE:g}, with the LoRA",
        "base_s": round(base_s, 3),
        "base": f"DPM-Solver++ 2M, {ctx.plan.fast_base_steps} steps, guidance {BASE_GUIDANCE:g}",
        "speed_up": round(base_s / fast_s, 2),
    }
    detail = f"{fast_s:.3f} s against {base_s:.3f} s ({base_s / fast_s:.1f}×)"
    if ctx.cuda:
        result.check(f"{FAST_STEPS} fast steps faster than {ctx.plan.fast_base_steps}", fast_s < base_s, detail)
        gpu = torch_gpu_name()
        goal = f"{FAST_STEPS}-step 512² image <= {FAST_GOAL_T4_S} s on a T4"
        ok = fast_s <= FAST_GOAL_T4_S if "T4" in gpu else None
        result.check(goal, ok, f"{fast_s:.3f} s on {gpu}" + ("" if ok is not None else " (the goal is a T4's)"))
    else:
        result.check(f"{FAST_STEPS} fast steps faster than {ctx.plan.fast_base_steps}", None, f"n/a on CPU: {detail}")
    compare_fast_mode(ctx, result, lora_path)


def fast_mode_call(ctx: Context, pipe, base_scheduler, fast: bool) -> float:
    """Seconds of one 1-image generation: fast mode (LCM, the LoRA at scale 1) or the base (LoRA at scale 0)."""
    import torch
    from diffusers import LCMScheduler

    from jsd.schedulers import DEFAULT_SCHEDULER, make_scheduler

    config = dict(base_scheduler.config)
    pipe.scheduler = LCMScheduler.from_config(config) if fast else make_scheduler(DEFAULT_SCHEDULER, config)
    synchronize()
    start = time.perf_counter()
    pipe(
        PROMPT,
        num_inference_steps=FAST_STEPS if fast else ctx.plan.fast_base_steps,
        guidance_scale=FAST_GUIDANCE if fast else BASE_GUIDANCE,
        height=ctx.plan.side,
        width=ctx.plan.side,
        generator=torch.Generator("cpu").manual_seed(0),
        cross_attention_kwargs={"scale": 1.0 if fast else 0.0},
    )
    synchronize()
    return time.perf_counter() - start


def random_fast_lora(pipe, folder: Path) -> Path:
    """A LoRA file of LCM-LoRA's shape for ``pipe``'s UNet (random A, zero B): what fast mode computes, not draws."""
    from peft import LoraConfig

    from jsd.lora_weights import save_lora
    from jsd.training.config import LCM_LORA_TARGET_MODULES
    from jsd.training.trainer import DISTILLED_LORA_NAME

    config = LoraConfig(
        r=FAST_PROBE_RANK,
        lora_alpha=FAST_PROBE_RANK,
        init_lora_weights="gaussian",
        target_modules=list(LCM_LORA_TARGET_MODULES),
    )
    pipe.unet.add_adapter(config, adapter_name="fast-probe")
    try:
        save_lora(folder, pipe.unet, adapter_name="fast-probe", weight_name=DISTILLED_LORA_NAME)
    finally:
        pipe.unload_lora_weights()
    return folder / DISTILLED_LORA_NAME


def torch_gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def real_weights() -> Path | None:
    """``$JSD_WEIGHTS``, else ``weights/``, when it holds a checkpoint that ``jsd.tiny`` did not write."""
    from jsd.manifest import read_manifest
    from jsd.tiny import TINY_SOURCE_PREFIX

    folder = Path(os.environ.get("JSD_WEIGHTS") or REPO / "weights")
    if not (folder / "model_index.json").is_file():
        return None
    try:
        source = read_manifest(folder).get("source", "")
    except (OSError, ValueError):
        source = ""
    return None if source.startswith(TINY_SOURCE_PREFIX) else folder


def compare_fast_mode(ctx: Context, result: StepResult, lora_path: Path) -> None:
    """The held-out prompts at fixed seeds, 25 steps against 4 fast steps, scored and paired (jsd.evaluation,
    the library of ``jsd evaluate --compare``). Needs real weights, a Japanese CLIP and ``--fast-lora``; the
    dry run takes the tiny checkpoint, the tiny scorer and the random LoRA (the path, not a quality figure)."""
    from jsd import evaluation, serving
    from jsd.clip_filter import load_scorer
    from jsd.schedulers import SCHEDULERS

    lcm = next((name for name in SCHEDULERS if name.upper().startswith("LCM")), None)
    weights = ctx.weights() if ctx.args.dry_run else real_weights()
    scorer_folder = find_scorer(ctx)
    missing = [
        what
        for what, present in (
            ("real weights ($JSD_WEIGHTS or weights/)", weights is not None),
            ("a Japanese CLIP (--scorer)", scorer_folder is not None),
            ("a fast-mode LoRA (--fast-lora)", ctx.args.dry_run or ctx.args.fast_lora is not None),
            ("the LCM scheduler in jsd.schedulers", lcm is not None),
        )
        if not present
    ]
    if missing:
        line = f"paired 4-step fast mode against 25 steps: skipped, missing {'; '.join(missing)}"
        result.skip("fast mode paired with 25 steps on the held-out prompts", line)
        return
    scorer = load_scorer(scorer_folder, name="--scorer", device=ctx.device)
    prompts = evaluation.read_prompts()[: ctx.plan.fast_prompts]
    side = ctx.plan.side
    base = evaluation.EvalSettings(
        num_inference_steps=ctx.plan.fast_base_steps, guidance_scale=BASE_GUIDANCE, width=side, height=side
    )
    fast = dataclasses.replace(base, num_inference_steps=FAST_STEPS, guidance_scale=FAST_GUIDANCE, scheduler=lcm)
    pipe = ctx.pipeline() if ctx.args.dry_run else serving.load_pipeline(weights, device=ctx.device)
    generator = serving.ImageGenerator(pipe)
    rows_base = evaluation.evaluate_arm(
        evaluation.Arm(f"{base.num_inference_steps} steps", generator), scorer, prompts, base
    )
    generator.set_default_lora(str(lora_path), name="--fast-lora")
    try:
        arm = evaluation.Arm(f"fast mode, {FAST_STEPS} steps", generator)
        rows_fast = evaluation.evaluate_arm(arm, scorer, prompts, fast)
    finally:
        generator.set_default_lora(None)
    report = evaluation.Evaluation(
        base,
        [
            evaluation.ArmResult(f"{base.num_inference_steps} steps", rows_base),
            evaluation.ArmResult(arm.label, rows_fast),
        ],
    )
    difference = report.difference
    result.figures["fast_mode_paired"] = {
        "weights": str(weights),
        "prompts": len(prompts),
        "base_mean": round(report.arms[0].interval.mean, 3),
        "fast_mean": round(report.arms[1].interval.mean, 3),
        "difference_base_minus_fast": difference.describe() if difference else "n/a",
        "verdict": report.verdict(),
    }
    result.check("fast mode paired with 25 steps on the held-out prompts", len(rows_fast) == len(prompts),
                 f"{len(rows_fast)} prompts; {report.verdict()}")  # fmt: skip
    if ctx.args.dry_run:
        result.notes.append("fast_mode_paired: tiny weights, tiny scorer and a random LoRA: the path, not quality")


STEP = Step("fast-mode", "fast mode: 4 LCM steps with an LCM-LoRA against 25 steps", step_fast_mode)
