"""What a run does: the GPU's plan (full-size weights, 512², the budgets of the issue's 8 minutes) or the dry run's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
TOTAL_BUDGET_S = 480.0  # the issue's 8 minutes, set-up included: the GPU steps' budgets and STARTUP_BUDGET_S
STARTUP_BUDGET_S = 10.0  # imports, the environment, the report
PROMPT = "サラリーマン 油絵"  # the prompt of every generation but the held-out prompts'


@dataclass(frozen=True)
class Plan:
    """Model size, image sizes, steps and budgets: the GPU's, or the dry run's tiny ones."""

    size: str  # jsd.tiny shapes: "full" (SD v1) or "tiny"
    side: int  # the default image side of predictions
    steps: int  # denoising steps of the predictions of steps 2, 5 and 6
    # (scheduler, steps, batch, timed repeats); the first is also timed against diffusers, interleaved
    speed_runs: tuple[tuple[str, int, int, int], ...]
    budget_requests: tuple[tuple[str, int, int], ...]  # (mode, side, num_outputs), 2 steps each
    train_resolution: int
    train_precision: str
    clip_prompts: int | None  # how many of the held-out prompts step 8 scores (None: all 50)
    clip_steps: int  # denoising steps of its images
    fast_repeats: int  # timed calls per arm of step 9 (fast mode), interleaved
    fast_base_steps: int  # the steps fast mode is timed against (the served 25; fewer in the dry run)
    fast_prompts: int | None  # held-out prompts step 9 pairs (4 fast steps against 25; None: all 50)
    budgets: dict[str, float]
    compile_kwargs: dict | None = None  # None: jsd.optimize's own (the production setting)


GPU_PLAN = Plan(
    size="full",
    side=512,
    steps=25,
    speed_runs=(("DPM-Solver++ 2M", 25, 1, 3), ("DPM-Solver++ 2M", 25, 4, 1), ("PNDM", 50, 1, 2), ("PNDM", 50, 4, 1)),
    budget_requests=(("txt2img", 768, 4), ("txt2img", 1024, 2), ("img2img", 768, 4), ("inpaint", 768, 4)),
    train_resolution=256,
    train_precision="fp16",
    clip_prompts=None,
    clip_steps=10,  # 50 images at 512²: the scores are of random weights anyway; the path and the time count
    fast_repeats=3,
    fast_base_steps=25,
    fast_prompts=10,  # with real weights: 10 × (25 + 4 steps) fits the step's hard limit on a T4
    budgets={
        "weights": 40,
        "pytest-gpu": 50,
        "production": 45,
        "speed": 70,
        "pixel-budget": 35,
        "oom": 15,
        "compile": 90,
        "training": 75,
        "clip-score": 30,
        "fast-mode": 20,
    },
)
# CPU: tiny shapes and sides a quarter of the GPU's (never below serving.MIN_SIDE), few steps. No
# Inductor: compiling even the tiny UNet takes minutes on a small CPU, so the dry run captures the
# graph with Dynamo (fullgraph, backend "eager"), which still fails on any graph break.
DRY_RUN_PLAN = Plan(
    size="tiny",
    side=128,
    steps=4,
    speed_runs=(("DPM-Solver++ 2M", 3, 1, 2), ("DPM-Solver++ 2M", 3, 4, 1), ("PNDM", 6, 1, 1), ("PNDM", 6, 4, 1)),
    budget_requests=(("txt2img", 192, 4), ("txt2img", 256, 2), ("img2img", 192, 4), ("inpaint", 192, 4)),
    train_resolution=64,
    train_precision="no",
    clip_prompts=8,
    clip_steps=2,
    fast_repeats=1,
    fast_base_steps=6,  # the dry run checks the path; 25 tiny steps on a busy CPU cost ~15 s
    fast_prompts=2,
    # what a busy 2-core CI host takes (four Python processes start: each imports torch and diffusers)
    budgets={
        "weights": 10,
        "pytest-gpu": 25,
        "production": 45,
        "speed": 15,
        "pixel-budget": 10,
        "oom": 5,
        "compile": 20,
        "training": 30,
        "clip-score": 20,
        "fast-mode": 15,
    },
    compile_kwargs={"backend": "eager", "fullgraph": True},
)
