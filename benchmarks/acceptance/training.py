"""Training smoke: 10 stage-2 steps through scripts/train.py (fp16, gradient checkpointing), the loss finite, and
the exported folder served by ``Predictor.setup()`` with the production checks."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

from acceptance.context import Context, free_memory, last_line
from acceptance.plan import PROMPT, REPO
from acceptance.production import served_checks
from acceptance.runner import Step, StepResult

CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている", "富士山と雲"]  # of the training images


def step_training(ctx: Context, result: StepResult) -> None:
    """10 stage-2 steps through scripts/train.py (the stage-2 recipe), then Predictor.setup() on the output."""
    from bench_common import write_captioned_images

    ctx.release()
    data = write_captioned_images(
        ctx.workdir / "train-data", ctx.plan.train_resolution, CAPTIONS, count=4, noise_step=16
    )
    output = ctx.workdir / "train-out"
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(ctx.workdir / "train-out-run", ignore_errors=True)
    flags = ["--config", "configs/train/stage2.json", "--pretrained_model_name_or_path", str(ctx.weights())]
    flags += ["--train_data_dir", str(data), "--output_dir", str(output), "--report_to", "none"]
    flags += ["--resolution", str(ctx.plan.train_resolution), "--train_batch_size", "1", "--max_train_steps", "10"]
    flags += ["--checkpointing_steps", "10", "--lr_warmup_steps", "0", "--seed", "0"]
    flags += ["--mixed_precision", ctx.plan.train_precision, "--gradient_checkpointing"]
    if ctx.plan.train_precision != "fp16":
        result.notes.append("dry run: --mixed_precision no (fp16 needs CUDA; the trainer refuses it on CPU)")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "scripts/train.py", *flags], cwd=REPO, env=env, capture_output=True, text=True
    )
    print(done.stderr[-3000:], flush=True)
    losses = [float(x) for x in re.findall(r"loss=([-+0-9.eEnaif]+)", done.stderr)]
    result.figures |= {
        "command": "python scripts/train.py " + " ".join(flags).replace(str(ctx.workdir), "$WORKDIR"),
        "exit_status": done.returncode,
        "last_loss": losses[-1] if losses else None,
    }
    if done.returncode:
        raise RuntimeError(f"scripts/train.py exited {done.returncode}: {last_line(done.stderr)}")
    finite = bool(losses) and all(map(math.isfinite, losses))
    result.check(
        "loss finite at every step", finite, "exit 0: the trainer stops at a non-finite loss; progress bar read"
    )
    serve_exported(ctx, result, output)


def serve_exported(ctx: Context, result: StepResult, output: Path) -> None:
    """``Predictor.setup()`` on the exported folder, its checks, and one small generation."""
    from jsd.serving import GenerationRequest

    predict = ctx.repo_module("predict.py", "predict")
    with mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(output)}):
        predictor = predict.Predictor()
        predictor.setup()
    try:
        revision = predictor.generator.model_revision
        result.check("exported weights load in Predictor.setup()", revision == "stage2-step10", f"revision {revision}")
        result.checks += served_checks(predictor.generator.pipeline)
        side = ctx.plan.train_resolution if ctx.plan.train_resolution >= 128 else 128
        images = predictor.generator.generate(
            GenerationRequest(prompt=PROMPT, width=side, height=side, num_inference_steps=2, seed=0)
        ).images
        result.check("exported weights generate", len(images) == 1, f"1×{side}², 2 steps")
    finally:
        predictor = None
        free_memory()


STEP = Step("training", "training smoke: 10 stage-2 steps, fp16, gradient checkpointing", step_training)
