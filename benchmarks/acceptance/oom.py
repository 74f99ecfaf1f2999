"""A real CUDA out-of-memory error (the allocator capped just above what it holds): the prediction fails clearly,
its tensors are freed, the next one succeeds and memory is back. On CPU a UNet pre-hook raises CUDA's error."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from acceptance.context import Context, free_memory
from acceptance.pixel_budget import budget_request
from acceptance.plan import GIB
from acceptance.runner import Step, StepResult


def step_oom(ctx: Context, result: StepResult) -> None:
    """A real CUDA OOM (the allocator capped just above what is in use); then a normal request."""
    import torch

    from jsd import serving

    pipe = ctx.pipeline()
    generator = serving.ImageGenerator(pipe)
    side, batch = ctx.plan.budget_requests[0][1:]
    big = budget_request("txt2img", side, batch)
    small = budget_request("txt2img", ctx.plan.side, 1)
    free_memory()
    baseline = torch.cuda.memory_allocated() if ctx.cuda else None
    refs: list = []
    with capture_unet_input(pipe.unet, refs, raise_oom=not ctx.cuda), cap_cuda_memory(ctx.cuda) as cap:
        try:
            generator.generate(big)
            error = None
        except serving.GenerationError as err:
            error = str(err)
    gc.collect()
    result.figures["failed_request"] = f"{batch}×{side}², 2 steps" + (f", allocator capped at {cap}" if cap else "")
    result.figures["error"] = error
    result.check("prediction fails with a clear message", bool(error and "out of memory" in error), error or "")
    freed = refs[0]() is None if refs else None  # None: the error came before the UNet ran
    result.check("the failed call's tensors are freed", freed, "the UNet's input, by weak reference")
    generator.generate(small)  # raises if the next prediction fails
    result.check("next prediction succeeds", True, f"1×{ctx.plan.side}²")
    if ctx.cuda:
        free_memory()
        after = torch.cuda.memory_allocated()
        result.figures |= {"allocated_before_mib": baseline // 2**20, "allocated_after_mib": after // 2**20}
        result.check("memory back to where it was", abs(after - baseline) <= 16 * 2**20, f"{after - baseline:+,} bytes")
    else:
        result.check("memory back to where it was", None, "n/a on CPU")
        result.notes.append(
            "CPU: no CUDA allocator to exhaust, so a UNet forward pre-hook raises torch.cuda.OutOfMemoryError; "
            "the rest is the real path: ImageGenerator catches it, frees memory, raises GenerationError"
        )


@contextlib.contextmanager
def capture_unet_input(unet, refs: list, *, raise_oom: bool) -> Iterator[None]:
    """Keep a weak reference to the UNet's first input; with ``raise_oom``, raise CUDA's OOM error there."""
    import weakref

    import torch

    def hook(module, args):
        if not refs:
            refs.append(weakref.ref(args[0]))
        if raise_oom:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by the dry run in a UNet pre-hook)")

    handle = unet.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def cap_cuda_memory(cuda: bool, headroom: int = 256 * 2**20) -> Iterator[str | None]:
    """Cap PyTorch's CUDA allocator at what it holds now plus ``headroom`` (the cap is lifted afterwards)."""
    import torch

    if not cuda:
        yield None
        return
    free_memory()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + headroom
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        yield f"{cap / GIB:.2f} GiB"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


STEP = Step("oom", "real CUDA out of memory, then recovery", step_oom)
