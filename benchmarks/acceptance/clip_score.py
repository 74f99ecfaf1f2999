"""Japanese CLIP: the held-out prompts generated at fixed seeds and scored as ``jsd evaluate`` does, when a scorer
is present (``--scorer``, else ``$JSD_WEIGHTS/japanese_clip``, else ``weights/japanese_clip``; the dry run writes a
tiny one); without one the step says so in a line and passes."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from acceptance.context import Context, synchronize
from acceptance.plan import REPO
from acceptance.runner import Step, StepResult


def step_clip_score(ctx: Context, result: StepResult) -> None:
    """The held-out prompts generated at fixed seeds and scored (jsd.evaluation), when a scorer is present."""
    import torch

    from jsd import evaluation, serving
    from jsd.clip_filter import load_scorer

    folder = find_scorer(ctx)
    if folder is None:
        line = "no Japanese CLIP scorer (--scorer, $JSD_WEIGHTS/japanese_clip, weights/japanese_clip): skipped"
        result.skip("held-out prompts scored", line)
        return
    scorer = load_scorer(folder, name="--scorer", device=ctx.device)
    prompts = evaluation.read_prompts()[: ctx.plan.clip_prompts]
    side = ctx.plan.side
    settings = evaluation.EvalSettings(num_inference_steps=ctx.plan.clip_steps, width=side, height=side)
    arm = evaluation.Arm("random weights", serving.ImageGenerator(ctx.pipeline()))
    start = time.perf_counter()
    rows = evaluation.evaluate_arm(arm, scorer, prompts, settings)
    synchronize()
    total = time.perf_counter() - start
    images = [_png_image(row.png) for row in rows]
    start = time.perf_counter()
    again = scorer.score(images, prompts).tolist()
    synchronize()
    scoring = time.perf_counter() - start
    interval = evaluation.t_interval([r.clip_score for r in rows])
    result.figures |= {
        "scorer": str(folder),
        "prompts": len(rows),
        "setting": f"{side}², {ctx.plan.clip_steps} steps, seeds 0..{len(rows) - 1}, one image per prompt",
        "generate_and_score_s": round(total, 2),
        "images_scored_per_s": round(len(images) / scoring, 1),
        "mean_clip_score": round(interval.mean, 3),
        "ci95": [round(interval.low, 3), round(interval.high, 3)],
    }
    scores = [r.clip_score for r in rows]
    result.check("every held-out prompt scored", len(rows) == len(prompts), f"{len(rows)} of {len(prompts)}")
    result.check(
        "scores within 0..100", all(0.0 <= s <= 100.0 for s in scores), f"{min(scores):.2f}..{max(scores):.2f}"
    )
    worst = max(abs(a - b) for a, b in zip(again, scores, strict=True))
    result.check("scoring again gives the same scores", worst <= 1e-2, f"max |diff| {worst:.1e}")
    dtype = getattr(scorer, "dtype", None)
    if ctx.cuda:
        result.check("scorer in fp16 on CUDA", dtype == torch.float16, f"dtype {dtype}")
    else:
        result.check("scorer in fp16 on CUDA", None, f"n/a on CPU (dtype {dtype})")
    result.notes.append("the images are of random weights: the scores show the path works and its cost, not quality")


def find_scorer(ctx: Context) -> Path | None:
    """`--scorer`, else `$JSD_WEIGHTS/japanese_clip`, else `weights/japanese_clip`; the dry run writes a tiny one."""
    from jsd.japanese_clip import SCORER_FOLDER, scorer_folder

    if ctx.args.scorer is not None:
        return ctx.args.scorer
    candidates = [scorer_folder(os.environ["JSD_WEIGHTS"])] if os.environ.get("JSD_WEIGHTS") else []
    candidates.append(scorer_folder(REPO / "weights"))
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None and ctx.args.dry_run:
        from bench_common import default_tokenizer_model

        from jsd.tiny import write_tiny_scorer

        found = write_tiny_scorer(ctx.workdir / SCORER_FOLDER, tokenizer=default_tokenizer_model())
    return found


def _png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


STEP = Step("clip-score", "Japanese CLIP: the held-out prompts generated and scored", step_clip_score)
