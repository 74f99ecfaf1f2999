"""The Japanese CLIP scorer: images scored per second at 224², and best-of-N against N separate requests.

    nice python benchmarks/bench_clip.py                       # full-size random scorer (~0.8 GB in /tmp, deleted)
    python benchmarks/bench_clip.py --scorer-size tiny --repeats 1   # a quick check of the harness
    python benchmarks/bench_clip.py --device cuda              # on a GPU host (the scorer runs in fp16 there)

Part 1 writes a seeded scorer with the real shapes (``jsd.tiny.write_tiny_scorer(size="full")``: ViT-B/16 and a
12-layer BERT-base, projection 512, rinna's 32,000-piece tokenizer when ``../shared`` has it) in the served
layout, loads it with ``JapaneseCLIPScorer.from_pretrained`` and times ``score()`` of 224×224 images against
one prompt (the text is encoded once per call) at several batch sizes.

Part 2 times the same request two ways on a tiny pipeline with the tiny scorer: ``num_candidates=N`` (one
request, candidates batched within the pixel budget, then scored) against N separate ``num_candidates=1``
requests with the candidates' seeds. The ratio is what best-of-N costs against asking N times yourself.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

try:
    import numpy as np
    import torch
    from bench_common import default_tokenizer_model, device_label, median  # benchmarks/ is on sys.path
    from PIL import Image
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

PROMPT = "夕焼けの海を走る赤い帽子の猫 油絵"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scorer-size", choices=["full", "tiny"], default="full", help="shapes of part 1's scorer")
    parser.add_argument("--batch-sizes", default="1,8,32", help="images per score() call in part 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--candidates", type=int, default=4, help="N of part 2")
    parser.add_argument("--side", type=int, default=256, help="image side of part 2 (pixels)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of part 2")
    return parser.parse_args(argv)


def images_224(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(count)]


def timed(fn, device: torch.device) -> float:
    from bench_common import synchronize

    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_scoring(args: argparse.Namespace, device: torch.device, workdir: Path) -> None:
    from jsd.japanese_clip import JapaneseCLIPScorer
    from jsd.tiny import write_tiny_scorer

    folder = write_tiny_scorer(
        workdir / "scorer", kind="clip", size=args.scorer_size, tokenizer=default_tokenizer_model()
    )
    scorer = JapaneseCLIPScorer.from_pretrained(folder, device=device)
    vision, text = scorer.model.vision_config, scorer.model.text_config
    print(
        f"scorer: {args.scorer_size} random weights — ViT {vision.num_hidden_layers}×{vision.hidden_size} "
        f"patch {vision.patch_size}, BERT {text.num_hidden_layers}×{text.hidden_size} vocab {text.vocab_size}, "
        f"{sum(p.numel() for p in scorer.model.parameters()) / 1e6:.1f} M parameters, {scorer.dtype}"
    )
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    images = images_224(max(sizes))
    scorer.score(images[:1], [PROMPT])  # warm-up
    rates = {}
    for size in sizes:
        runs = [
            timed(lambda s=size: scorer.score(images[:s], [PROMPT] * s, batch_size=s), device)
            for _ in range(args.repeats)
        ]
        rates[size] = size / median(runs)
        print(f"  score() of {size:>3} images at 224²: {median(runs):7.3f} s  → {rates[size]:7.2f} images/s")
    text_runs = [timed(lambda: scorer.text_features([PROMPT]), device) for _ in range(args.repeats)]
    print(f"  one text (77 ids): {median(text_runs) * 1000:.1f} ms")
    base = rates[sizes[0]]
    print(
        "  images/s relative to batch "
        + str(sizes[0])
        + ": "
        + ", ".join(f"{s}: {r / base:.2f}×" for s, r in rates.items())
    )


def bench_best_of_n(args: argparse.Namespace, device: torch.device, workdir: Path) -> None:
    from jsd import serving
    from jsd.japanese_clip import JapaneseCLIPScorer
    from jsd.tiny import make_checkpoint, write_tiny_scorer

    weights = make_checkpoint(workdir / "weights", tokenizer_model=default_tokenizer_model())
    scorer = JapaneseCLIPScorer.from_pretrained(write_tiny_scorer(workdir / "tiny-scorer"), device=device)
    pipe = serving.load_pipeline(weights, device=device)
    pipe.set_progress_bar_config(disable=True)
    generator = serving.ImageGenerator(pipe, model_revision="bench", scorer=scorer)
    n = args.candidates
    common = {"prompt": PROMPT, "width": args.side, "height": args.side, "num_inference_steps": args.steps}
    per_batch = min(n, serving.MAX_PIXELS // (args.side * args.side))
    print(
        f"\nbest-of-{n}: tiny pipeline {args.side}² × {args.steps} steps, tiny scorer; one request with "
        f"num_candidates={n} (batches of {per_batch}) against {n} requests of one image"
    )
    generator.generate(serving.GenerationRequest(**common, seed=0))  # warm-up
    best, separate, scoring = [], [], []
    real_score = scorer.score

    def timed_score(*a, **k):
        start = time.perf_counter()
        try:
            return real_score(*a, **k)
        finally:
            scoring.append(time.perf_counter() - start)

    scorer.score = timed_score
    for repeat in range(args.repeats):  # interleaved, so that a busy moment hits both arms
        seed = 1000 * (repeat + 1)
        best.append(
            timed(
                lambda s=seed: generator.generate(serving.GenerationRequest(**common, seed=s, num_candidates=n)), device
            )
        )
        separate.append(
            timed(
                lambda s=seed: [generator.generate(serving.GenerationRequest(**common, seed=s + j)) for j in range(n)],
                device,
            )
        )
    print(f"  one request, num_candidates={n}: {median(best):.3f} s (of which scoring {median(scoring):.3f} s)")
    print(f"  {n} separate requests:          {median(separate):.3f} s")
    print(f"  best-of-{n} / {n} separate requests: {median(best) / median(separate):.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(device_label(device))
    workdir = Path(tempfile.mkdtemp(prefix="jsd-bench-clip-"))
    try:
        bench_scoring(args, device, workdir)
        bench_best_of_n(args, device, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
