"""Fast mode against the plain sampler: time per image at 4 steps against 25, side by side in one run.

    .venv/bin/python benchmarks/bench_fast_mode.py --threads 1                                  # CPU, tiny shapes
    nice .venv/bin/python benchmarks/bench_fast_mode.py --size full --side 256 --repeats 2 --threads 1  # CPU, SD v1
    .venv/bin/python benchmarks/bench_fast_mode.py --weights weights --fast_mode lcm             # your weights/

Two arms through :class:`jsd.serving.ImageGenerator` on one loaded checkpoint, as a prediction runs them, interleaved
(the order alternates every repeat) after one untimed call each:

- ``plain``: ``fast_mode`` off and the defaults: 25 steps, guidance 7.5 (classifier-free guidance: the UNet sees a
  batch of 2 per step), DPM-Solver++ 2M;
- ``fast``: ``fast_mode`` NAME and the same defaults, which it resolves to its own: 4 steps, guidance 1 (no
  classifier-free guidance: a batch of 1), its scheduler; its LoRA is loaded before and unloaded after every
  request, as in serving, and that time is counted.

It prints the median seconds per image of each arm and their ratio plain / fast (the issue's 5-8x). The speed
comes from fewer steps and no guidance batch, not from the LoRA's values: without ``--weights`` a seeded random
checkpoint and LoRA (``jsd.tiny``) measure it. What fast mode costs in quality needs real weights and the
Japanese CLIP: docs/performance.md#fast-mode gives that command.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

try:
    import torch
    from bench_common import default_tokenizer_model, device_label, median  # benchmarks/ is on sys.path

    from jsd.fast_mode import RECIPES, load_fast_loras
    from jsd.serving import GenerationRequest, ImageGenerator, load_pipeline
    from jsd.tiny import make_checkpoint
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

PROMPT = "サラリーマン 油絵"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a checkpoint with fast/<NAME>/ (default: a seeded one, made now)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="shapes of the seeded checkpoint")
    parser.add_argument("--fast_mode", "--fast-mode", default="lcm", choices=list(RECIPES), help="the fast arm's mode")
    parser.add_argument("--side", type=int, default=256, help="width and height in pixels (default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per arm (default: 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def timed(generator: ImageGenerator, request: GenerationRequest) -> float:
    if generator.pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generator.generate(request)
    if generator.pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def resolve(generator: ImageGenerator, request: GenerationRequest) -> GenerationRequest:
    """The request as it runs: with a fast mode, its steps, guidance and scheduler."""
    fast = generator.fast_lora(request.fast_mode)
    return request.validate(fast.settings if fast else None).request


def run(weights: Path, args: argparse.Namespace) -> None:
    generator = ImageGenerator(load_pipeline(weights, device=args.device))
    generator.pipeline.set_progress_bar_config(disable=True)
    generator.set_fast_loras(load_fast_loras(weights))
    common = {"prompt": PROMPT, "width": args.side, "height": args.side, "seed": 0, "output_format": "png"}
    arms = {"plain": GenerationRequest(**common), "fast": GenerationRequest(**common, fast_mode=args.fast_mode)}
    resolved = {name: resolve(generator, request) for name, request in arms.items()}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for request in arms.values():  # untimed: first-call allocations, LoRA file reads
        timed(generator, request)
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            seconds[name].append(timed(generator, arms[name]))
    print(device_label(generator.pipeline.device))
    print(f"checkpoint: {weights} ({args.size if args.weights is None else 'given'}), {args.side}x{args.side} px")
    for name in arms:
        r = resolved[name]
        print(
            f"{name:>5}: {median(seconds[name]):7.3f} s per image (median of {args.repeats}) — "
            f"{r.num_inference_steps} steps, guidance {r.guidance_scale:g}, {r.scheduler}"
        )
    print(f"ratio plain / fast: {median(seconds['plain']) / median(seconds['fast']):.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights is not None:
        run(args.weights, args)
        return
    with tempfile.TemporaryDirectory(prefix="jsd-bench-fast-") as scratch:
        weights = make_checkpoint(
            Path(scratch) / "weights",
            tokenizer_model=default_tokenizer_model(),
            size=args.size,
            torch_dtype=torch.float16 if args.size == "full" else torch.float32,  # half the bytes to write
            fast_modes=[args.fast_mode],
        )
        run(weights, args)


if __name__ == "__main__":
    main()
