"""The pixel budget: peak memory of the largest requests ``jsd.serving`` allows against a T4's 15 GiB, and the
``MAX_PIXELS`` that the measured bytes per pixel support."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from acceptance.context import Context, free_memory, gib, half_mask
from acceptance.plan import GIB, PROMPT
from acceptance.runner import Step, StepResult

T4_USABLE_BYTES = 15 * GIB  # a T4's 16 GB less the CUDA context: what one request may peak at


def step_pixel_budget(ctx: Context, result: StepResult) -> None:
    """Peak memory of the largest allowed requests (through ImageGenerator, budget check included)."""
    import torch

    from jsd import serving

    pipe = ctx.pipeline()
    generator = serving.ImageGenerator(pipe)
    free_memory()
    baseline = torch.cuda.memory_reserved() if ctx.cuda else None  # the weights, as the allocator holds them
    rows, peaks = [], []
    for mode, side, batch in ctx.plan.budget_requests:
        request = budget_request(mode, side, batch)
        request.validate()  # the serving budget must allow it
        peak = measure_peak(ctx, lambda request=request: generator.generate(request))
        peaks.append((side * side * batch, peak["reserved"]))
        rows.append(
            {
                "mode": mode,
                "request": f"{batch}×{side}²",
                "pixels": side * side * batch,
                "peak_allocated_gib": gib(peak["allocated"]) if ctx.cuda else "n/a on CPU",
                "peak_reserved_gib": gib(peak["reserved"]) if ctx.cuda else "n/a on CPU",
            }
        )
        print(rows[-1], flush=True)
    result.figures["requests"] = rows
    result.figures["max_pixels_now"] = serving.MAX_PIXELS
    if not ctx.cuda:
        result.check("peaks within 15 GiB", None, "n/a on CPU: no GPU evidence, MAX_PIXELS stays as it is")
        result.figures["recommended_max_pixels"] = "n/a (no GPU evidence)"
        return
    verdict = recommend_max_pixels(baseline, peaks)
    result.figures |= verdict
    print(f"recommended MAX_PIXELS = {verdict['recommended_max_pixels']:,} ({verdict['verdict']})", flush=True)
    result.check(
        "largest allowed requests peak within 15 GiB (reserved)",
        verdict["proven"],
        f"worst {max(r['peak_reserved_gib'] for r in rows):.2f} GiB",
    )


def budget_request(mode: str, side: int, batch: int):
    """A request at the pixel budget: txt2img, or img2img / inpaint on a generated image of that size."""
    from PIL import Image

    from jsd.serving import GenerationRequest

    request = GenerationRequest(
        prompt=PROMPT, width=side, height=side, num_outputs=batch, num_inference_steps=2, seed=0, output_format="png"
    )
    if mode != "txt2img":
        request.image = Image.effect_noise((side, side), 64).convert("RGB")
        request.prompt_strength = 1.0
    if mode == "inpaint":
        request.mask = half_mask(side)
    return request


def measure_peak(ctx: Context, fn: Callable[[], Any]) -> dict[str, int | None]:
    """Peak CUDA memory (allocated and reserved by PyTorch's allocator) of ``fn()``; ``None`` on CPU."""
    import torch

    if not ctx.cuda:
        fn()
        return {"allocated": None, "reserved": None}
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def recommend_max_pixels(baseline: int, peaks: list[tuple[int, float]], limit: int = T4_USABLE_BYTES) -> dict:
    """Keep ``MAX_PIXELS`` when every measured peak fits ``limit``; else the largest budget a linear fit allows.

    Memory above the weights (``baseline``) grows about linearly with pixels (SDPA never materialises the
    attention matrix), so the worst measured bytes per pixel bound what a budget may allow.
    """
    from jsd.serving import MAX_PIXELS

    per_pixel = max((peak - baseline) / pixels for pixels, peak in peaks)
    ceiling = int((limit - baseline) / per_pixel) // 4096 * 4096  # a whole number of 64×64 tiles
    proven = all(peak <= limit for _, peak in peaks)
    return {
        "proven": proven,
        "verdict": "proven: keep it" if proven else "must change: the budget's requests exceed 15 GiB",
        "recommended_max_pixels": MAX_PIXELS if proven else ceiling,
        "linear_ceiling_pixels": ceiling,
        "bytes_per_pixel": round(per_pixel),
    }


STEP = Step("pixel-budget", "pixel budget: the largest allowed requests against 15 GiB", step_pixel_budget)
