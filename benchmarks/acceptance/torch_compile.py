"""``JSD_TORCH_COMPILE=1`` against eager: compile time, first call, steady-state speed-up, images of the same seed."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from unittest import mock

from acceptance.context import Context, free_memory, synchronize, timed
from acceptance.plan import PROMPT
from acceptance.runner import Step, StepResult

COMPILE_TOLERANCE = 0.02  # mean |compiled - eager| of the images, on a 0..1 scale (about 5/255)


def step_compile(ctx: Context, result: StepResult) -> None:
    """Eager against ``JSD_TORCH_COMPILE=1`` (a fresh Predictor.setup()), same request and seed."""
    import numpy as np

    from jsd import optimize, serving

    request = serving.GenerationRequest(
        prompt=PROMPT, width=ctx.plan.side, height=ctx.plan.side, num_inference_steps=ctx.plan.steps, seed=0
    )
    eager_gen = serving.ImageGenerator(ctx.pipeline())
    eager_gen.generate(request)  # warm
    eager_s, eager_images = timed_generations(eager_gen, request, 2)
    ctx.release()
    predict = ctx.repo_module("predict.py", "predict")
    seconds: dict[str, float] = {}
    patches = {"JSD_TORCH_COMPILE": "1", "JSD_WEIGHTS": str(ctx.weights())}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, patches))
        stack.enter_context(timed(optimize, "warm_up", seconds, "compile"))
        if ctx.plan.compile_kwargs is not None:
            stack.enter_context(mock.patch.object(optimize, "COMPILE_KWARGS", ctx.plan.compile_kwargs))
            stack.enter_context(mock.patch.object(optimize, "WARMUP_SIZE", ctx.plan.side))
            result.notes.append(f"dry run: torch.compile with {ctx.plan.compile_kwargs} (Dynamo only, no Inductor)")
        predictor = predict.Predictor()
        start = time.perf_counter()
        predictor.setup()
        setup_s = time.perf_counter() - start
    try:
        first_s, _ = timed_generations(predictor.generator, request, 1)
        steady_s, images = timed_generations(predictor.generator, request, 2)
    finally:
        predictor = None  # the compiled UNet's memory (and CUDA graphs) go before the next step
        free_memory()
        import torch

        torch._dynamo.reset()
    diff = np.abs(np.stack(images).astype(np.float64) - np.stack(eager_images).astype(np.float64)) / 255
    result.figures |= {
        "request": f"1×{ctx.plan.side}², {ctx.plan.steps} steps, {request.scheduler}",
        "setup_with_compile_s": round(setup_s, 2),
        "compile_s": round(seconds.get("compile", math.nan), 2),
        "first_call_s": round(first_s, 3),
        "steady_s": round(steady_s, 3),
        "eager_s": round(eager_s, 3),
        "speed_up": round(eager_s / steady_s, 3),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
    }
    detail = f"mean |compiled - eager| {diff.mean():.4f}, max {diff.max():.3f} (0..1 scale)"
    result.check(f"images match eager (mean |diff| <= {COMPILE_TOLERANCE})", diff.mean() <= COMPILE_TOLERANCE, detail)
    result.notes.append("compile_s: the warm-up of setup() (2 steps at the default size), where compilation happens")


def timed_generations(generator, request, count: int) -> tuple[float, list]:
    """Median seconds of ``count`` generations and the last one's images as arrays."""
    import numpy as np

    times, images = [], []
    for _ in range(count):
        synchronize()
        start = time.perf_counter()
        output = generator.generate(request)
        synchronize()
        times.append(time.perf_counter() - start)
        images = [np.asarray(item.image) for item in output.images]
    return statistics.median(times), images


STEP = Step("compile", "torch.compile (JSD_TORCH_COMPILE=1) against eager", step_compile)
