"""Our pipeline against diffusers' own, on the same components: what does the Japanese front end cost?

    .venv/bin/python benchmarks/bench_pipeline.py --threads 1                            # CPU, tiny shapes, 256 px
    nice .venv/bin/python benchmarks/bench_pipeline.py --size full --steps 2 --repeats 3 --threads 1  # CPU, SD v1
    .venv/bin/python benchmarks/bench_pipeline.py --device cuda                          # GPU: 512 px, 25 and 50 steps
    .venv/bin/python benchmarks/bench_pipeline.py --device cuda --weights weights/       # the same, real weights

Two arms, run interleaved (the order alternates every repeat) after one untimed call each:

- ``jsd``: ``JapaneseStableDiffusionPipeline(prompt=...)`` — our tokenizer, prompt encoding and
  ``encode_prompt`` override, then diffusers' denoising loop, VAE decode and safety checker;
- ``diffusers``: ``StableDiffusionPipeline(**same components)(prompt_embeds=..., negative_prompt_embeds=...)``
  with the embeddings computed *inside the timed region* the 2022 way (sentencepiece ids straight
  into the text encoder). diffusers' own tokenizer path cannot be used (it is CLIP's BPE), so both arms
  do the same work: tokenize, encode prompt and negative prompt, denoise, decode, check.

It prints the median seconds per image of each arm, their ratio (the overhead of our pipeline; the
target is <= 1.03) and the median of per-repeat ratios, the time spent outside the UNet (where the arms
can differ at all: on a busy CPU the UNet's own time varies by several percent from call to call), it/s
of the denoising loop, peak GPU memory on CUDA, and the largest pixel difference between the arms'
images (same seed: they should be equal). On CUDA the pipeline gets the
serving fast path first (jsd.optimize: fp16, SDPA, channels_last) and the scheduler is the served
default, DPM-Solver++ 2M.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
    import torch
    from bench_common import default_tokenizer_model, device_label, median, synchronize  # benchmarks/ is on sys.path
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    from jsd import JapaneseStableDiffusionPipeline, JapaneseTokenizer
    from jsd.optimize import optimize_pipeline, serving_dtype
    from jsd.tiny import build_pipeline, corpus_lines
    from jsd.tokenizer_training import train_sentencepiece
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

PROMPT = "サラリーマン 油絵"
TARGET_RATIO = 1.03


@dataclass
class Timings:
    """Per-call measurements of one arm."""

    seconds: list[float] = field(default_factory=list)
    outside_unet: list[float] = field(default_factory=list)
    steps_per_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    images: np.ndarray | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--size", choices=["tiny", "full"], help="random-weight shapes (default: tiny on CPU, full on CUDA)"
    )
    parser.add_argument("--weights", type=Path, help="a served or rinna checkpoint folder instead of random weights")
    parser.add_argument(
        "--tokenizer", type=Path, help="sentencepiece model (default: rinna's from ../shared if present)"
    )
    parser.add_argument("--height", type=int, help="default: 256 on CPU, 512 on CUDA")
    parser.add_argument("--width", type=int, help="default: 256 on CPU, 512 on CUDA")
    parser.add_argument("--steps", type=int, nargs="+", help="num_inference_steps (default: 25 on CPU, 25 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per arm (default: 5)")
    parser.add_argument("--batch", type=int, default=1, help="num_images_per_prompt (default: 1)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", choices=["dpm", "pndm"], default="dpm", help="DPM-Solver++ 2M or PNDM")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy host)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.size = args.size or ("full" if cuda else "tiny")
    args.height = args.height or (512 if cuda else 256)
    args.width = args.width or (512 if cuda else 256)
    args.steps = args.steps or ([25, 50] if cuda else [25])
    if args.repeats < 1 or min(args.steps) < 1:
        parser.error(f"--repeats and --steps must be at least 1, got {args.repeats} and {args.steps}")
    return args


def load(args: argparse.Namespace) -> JapaneseStableDiffusionPipeline:
    """The pipeline under test, on its device with the serving fast path."""
    if args.weights:
        pipe = JapaneseStableDiffusionPipeline.from_pretrained(args.weights, torch_dtype=serving_dtype(args.device))
        model = f"weights {args.weights}"
    else:
        tokenizer_model = args.tokenizer or default_tokenizer_model()
        if tokenizer_model:
            tokenizer = JapaneseTokenizer(str(tokenizer_model))
        else:
            tokenizer = train_sentencepiece(corpus_lines(), Path(tempfile.mkdtemp()), vocab_size=2000)
        pipe = build_pipeline(tokenizer, size=args.size, seed=0)
        model = f"{args.size} SD v1 shapes, random weights (tokenizer vocab {tokenizer.vocab_size})"
    scheduler_cls = DPMSolverMultistepScheduler if args.scheduler == "dpm" else PNDMScheduler
    overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2} if args.scheduler == "dpm" else {}
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    report = optimize_pipeline(pipe, args.device, compile=False, warmup=False)
    print(f"model: {model}")
    print(report.summary())
    return pipe


def reference_embeds(pipe, texts: list[str]) -> torch.Tensor:
    """The 2022 front end: lower-case, sentencepiece ids, ``</s>``, ``[PAD]`` to 77, text encoder."""
    rows = []
    for text in texts:
        pieces = [*pipe.tokenizer.sp_model.encode(text.lower())[:76], 2]
        rows.append(pieces + [3] * (77 - len(pieces)))
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor(rows, device=pipe.device))[0]


def run_once(name: str, jsd_pipe, diffusers_pipe, args, steps: int, timings: Timings) -> None:
    """One timed call of one arm; appends its figures to ``timings``."""
    step_ends: list[float] = []

    def on_step_end(pipe, i, t, callback_kwargs):
        synchronize(args.device)
        step_ends.append(time.perf_counter())
        return {}

    common = {
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "num_images_per_prompt": args.batch,
        "generator": torch.Generator("cpu").manual_seed(0),
        "output_type": "np",
        "callback_on_step_end": on_step_end,
    }
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    with unet_timer(jsd_pipe.unet, args.device) as unet_seconds:
        synchronize(args.device)
        start = time.perf_counter()
        if name == "jsd":
            images = jsd_pipe(PROMPT, **common).images
        else:
            embeds = reference_embeds(diffusers_pipe, [PROMPT, ""])
            images = diffusers_pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], **common).images
        synchronize(args.device)
        total = time.perf_counter() - start
    timings.seconds.append(total / args.batch)
    timings.outside_unet.append(total - sum(unet_seconds))
    if len(step_ends) > 1:
        timings.steps_per_s.append((len(step_ends) - 1) / (step_ends[-1] - step_ends[0]))
    if args.device.type == "cuda":
        timings.peak_bytes = max(timings.peak_bytes, torch.cuda.max_memory_allocated(args.device))
    timings.images = images


@contextmanager
def unet_timer(unet, device: torch.device):
    """Collect the seconds of every UNet forward: the arms run the same UNet, so the rest is where they differ."""
    seconds: list[float] = []
    starts: list[float] = []

    def before(module, args):
        synchronize(device)
        starts.append(time.perf_counter())

    def after(module, args, output):
        synchronize(device)
        seconds.append(time.perf_counter() - starts.pop())

    handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def bench_steps(jsd_pipe, diffusers_pipe, args, steps: int) -> dict[str, Timings]:
    """Interleaved runs of both arms at ``steps``; one untimed call each first."""
    arms = {"jsd": Timings(), "diffusers": Timings()}
    for name in arms:
        run_once(name, jsd_pipe, diffusers_pipe, args, steps, Timings())
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            run_once(name, jsd_pipe, diffusers_pipe, args, steps, arms[name])
    return arms


def report(arms: dict[str, Timings], args, steps: int) -> None:
    ours, theirs = arms["jsd"], arms["diffusers"]
    ratio = median(ours.seconds) / median(theirs.seconds)
    its = f"{median(ours.steps_per_s):.2f}" if ours.steps_per_s else "n/a (1 step)"
    vram = f"{ours.peak_bytes / 2**30:.2f} GiB" if args.device.type == "cuda" else "n/a (cpu)"
    print(f"\n{steps} steps, {args.height}x{args.width}, batch {args.batch}, {args.repeats} interleaved repeats:")
    print(f"  jsd        {median(ours.seconds):9.3f} s/image  (runs: {_runs(ours.seconds)})")
    print(f"  diffusers  {median(theirs.seconds):9.3f} s/image  (runs: {_runs(theirs.seconds)})")
    print(f"  denoising  {its} it/s (jsd)   peak memory allocated: {vram}")
    outside = median(ours.outside_unet), median(theirs.outside_unet)
    print(
        f"  outside the UNet (text encoder, scheduler, VAE, safety checker, Python): jsd {outside[0]:.3f} s, "
        f"diffusers {outside[1]:.3f} s per call"
    )
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    target = f"target <= {TARGET_RATIO}, {verdict}"
    # Each repeat runs both arms back to back: the median of per-repeat ratios is less sensitive to a busy host.
    paired = median([a / b for a, b in zip(ours.seconds, theirs.seconds, strict=True)])
    print(f"  paired ratio (median of per-repeat jsd / diffusers): {paired:.3f}")
    print(f"overhead ratio at {steps} steps (median jsd / median diffusers; {target}): {ratio:.3f}")
    diff = float(np.abs(ours.images.astype(np.float64) - theirs.images.astype(np.float64)).max())
    print(f"max |jsd - diffusers| = {diff:.2e}")


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(device_label(args.device))
    jsd_pipe = load(args)
    diffusers_pipe = StableDiffusionPipeline(**jsd_pipe.components)
    scheduler = "DPM-Solver++ 2M" if args.scheduler == "dpm" else "PNDM"
    print(f"scheduler {scheduler}, guidance {args.guidance_scale}, prompt {PROMPT!r}")
    with torch.inference_mode():
        for steps in args.steps:
            report(bench_steps(jsd_pipe, diffusers_pipe, args, steps), args, steps)


if __name__ == "__main__":
    main()
