"""GPU acceptance in one command: every CUDA claim of jsd measured on one NVIDIA GPU in under 8 minutes.

    python benchmarks/gpu_acceptance.py                       # on a CUDA host (make gpu-acceptance)
    python benchmarks/gpu_acceptance.py --dry-run             # on CPU: every step, tiny weights and sizes
    python benchmarks/gpu_acceptance.py --steps speed oom     # only some steps (the set-up always runs)
    python benchmarks/gpu_acceptance.py --workdir /tmp/jsd-acc          # keep the weights for a rerun

Offline. It writes full-size SD v1 / JSD-shaped weights (random, seeded, fp16 safetensors + manifest:
``jsd.tiny.make_checkpoint``) in the served layout, then runs, each within its budget:

1. ``pytest -m gpu`` (tests/test_gpu.py on those weights);
2. the production path: ``Predictor.setup()`` cold in a fresh process (imports / verify / load / to-device /
   fast path), fp16, SDPA and no fp32 copy on the GPU, then txt2img, img2img and inpaint through coglet
   on 127.0.0.1, outputs decoded;
3. speed: s/image, it/s and peak VRAM at 512², DPM-Solver++ 2M 25 steps and PNDM 50 steps, 1 and 4
   images, and our pipeline against diffusers' ``StableDiffusionPipeline`` (benchmarks/bench_pipeline.py);
4. the pixel budget: peak memory of the largest allowed requests against a T4's 15 GiB, and the
   ``MAX_PIXELS`` it supports;
5. a real CUDA out-of-memory error: the prediction fails clearly, the next one succeeds, memory is back;
6. ``JSD_TORCH_COMPILE=1``: compile time, first call, steady-state speed-up, images against eager;
7. training smoke: 10 stage-2 steps at 256 px, fp16, gradient checkpointing (scripts/train.py); the
   exported weights serve;
8. Japanese CLIP: the default held-out prompts (jsd/data/eval_prompts_ja.txt) generated and scored as
   ``python -m jsd evaluate`` does, when a scorer is present (``--scorer``, else ``$JSD_WEIGHTS/japanese_clip``,
   else ``weights/japanese_clip``); without one the step says so in a line and passes. The dry run writes
   a tiny scorer;
9. fast mode: s/image at 512², 4 ``LCMScheduler`` steps at guidance 1 with an LCM-LoRA (``--fast-lora``, else
   a random one of LCM-LoRA's shape: rank 64 on diffusers' LCM-LoRA layers) against 25 steps, side by side;
   with real weights, a Japanese CLIP and ``--fast-lora``, the held-out prompts paired, 4 fast steps against 25.

A failing step is reported and the others still run; the exit status is non-zero if any step failed.
The report (JSON, and a Markdown summary that is also printed) goes to ``benchmarks/results/`` under a
label naming the GPU, driver, CUDA and torch versions; it is rewritten after every step. Without CUDA
it refuses unless ``--dry-run``. docs/gpu-acceptance.md explains every figure; each step's check is one module
of benchmarks/acceptance/.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ is sys.path[0]: one module per step in acceptance/, the runner and the report beside them
from acceptance import (
    clip_score,
    fast_mode,
    oom,
    pixel_budget,
    production,
    pytest_gpu,
    speed,
    torch_compile,
    training,
    weights,
)
from acceptance.context import Context
from acceptance.plan import DRY_RUN_PLAN, GPU_PLAN, REPO
from acceptance.report import build_report, environment, markdown, write_report
from acceptance.runner import StepResult, run_steps

RESULTS = REPO / "benchmarks" / "results"
REFUSAL = (
    "gpu_acceptance: refused: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on an "
    "NVIDIA GPU, or pass --dry-run to check the script on CPU."
)
STEPS = [
    weights.STEP,  # the set-up: always runs
    pytest_gpu.STEP,
    production.STEP,
    speed.STEP,
    pixel_budget.STEP,
    oom.STEP,
    torch_compile.STEP,
    training.STEP,
    clip_score.STEP,
    fast_mode.STEP,
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in STEPS]
    parser.add_argument("--dry-run", action="store_true", help="run every step on CPU with tiny weights and sizes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the reports (default: %(default)s)")
    parser.add_argument(
        "--workdir", type=Path, help="weights and scratch files, kept and reused (default: a temporary folder, deleted)"
    )
    parser.add_argument("--steps", nargs="+", choices=names[1:], help="run only these steps (after the set-up)")
    parser.add_argument("--fail-step", choices=names, help="make this step raise (checks the failure reporting)")
    parser.add_argument(
        "--scorer", type=Path, help="Japanese CLIP folder for the clip-score step (default: $JSD_WEIGHTS/japanese_clip)"
    )
    parser.add_argument(
        "--fast-lora", type=Path, help="the fast-mode LoRA (.safetensors, e.g. from jsd distill) for the fast-mode step"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if importlib.util.find_spec("diffusers") is None:  # started by a Python without the project's packages
        from _venv import exit_with_hint  # this file's folder is sys.path[0]

        exit_with_hint("diffusers")
    started = time.perf_counter()
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU host: the predictor takes CUDA when it sees it
        # One thread (this process and its children): tiny models gain nothing from more, and on a busy
        # CI host two spinning OpenMP threads per process made each call 20 times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    env = environment(args.dry_run)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    keep = args.workdir is not None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jsd-gpu-acceptance-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s.name == "weights" or not args.steps or s.name in args.steps]
    ctx = Context(args, plan)

    def save(results: list[StepResult]) -> None:
        write_report(build_report(env, results, started, finished=False), args.out)

    # `timeout` sends SIGTERM: exit through the finally blocks (coglet stopped, scratch files removed);
    # the report of the steps already finished is on disk.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        results = run_steps(steps, ctx, plan.budgets, fail_step=args.fail_step, on_result=save)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    report = build_report(env, results, started, finished=True)
    json_path, md_path = write_report(report, args.out)
    print("\n" + markdown(report))
    print(f"report: {json_path}\nsummary: {md_path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
