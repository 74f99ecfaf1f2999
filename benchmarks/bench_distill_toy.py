"""Fast mode on a model that has learnt something: ``jsd distill`` on the toy checkpoint, judged by its pixels.

    .venv/bin/python benchmarks/bench_distill_toy.py                  # toy/weights, CPU, about 15 min
    .venv/bin/python benchmarks/bench_distill_toy.py --max_train_steps 300

Distils an LCM-LoRA for the committed toy checkpoint (docs/toy-world.md) with ``jsd distill`` on toy-world
pictures, then draws the same seen prompts at the same seeds three ways, side by side in one run, and asks the
toy world's pixel judge what each picture shows:

- teacher: the checkpoint, 25 steps, the served defaults (PNDM, guidance 7.5);
- student: the checkpoint + the distilled LoRA, ``LCMScheduler``, 4 steps, guidance 1 (fast mode's settings);
- plain: the checkpoint without the LoRA, the same ``LCMScheduler``, 4 steps, guidance 1.

It prints each one's prompt adherence (color, shape, position) and the student's share of the teacher's.
The goal (issue 23): the student reaches at least 90 % of the teacher's adherence and beats the plain 4 steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

try:
    import torch

    from jsd.serving import load_pipeline
    from jsd.toyworld import TOY_WEIGHTS, judge
    from jsd.toyworld.measure import sample_scenes
    from jsd.toyworld.world import examples, write_image_folder
    from jsd.training.clip_score import lcm_scheduler
    from jsd.training.config import DistillConfig, parse_config
    from jsd.training.lora_run import reset_accelerate
    from jsd.training.trainer import DISTILLED_LORA_NAME, train
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("color", "shape", "position")


def distill(checkpoint: Path, data: Path, output: Path, args: argparse.Namespace) -> Path:
    """``jsd distill`` in this process (the LCM-LoRA recipe's flags); returns the LoRA file."""
    argv = ["--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(data)]
    argv += ["--output_dir", str(output), "--report_to", "none", "--lr_warmup_steps", "0", "--resolution", "128"]
    argv += ["--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate)]
    argv += ["--lora_rank", str(args.lora_rank), "--train_batch_size", str(args.train_batch_size)]
    argv += ["--w_min", str(args.w_min), "--w_max", str(args.w_max), "--seed", str(args.seed)]
    argv += ["--checkpointing_steps", str(args.max_train_steps)]
    try:
        train(parse_config(argv, DistillConfig))
    finally:
        reset_accelerate()
    return output / DISTILLED_LORA_NAME


@torch.no_grad()
def adherence(pipe, scenes, *, steps: int, guidance_scale: float) -> dict[str, float]:
    images = []
    for i, scene in enumerate(scenes):
        generator = torch.Generator().manual_seed(i)
        settings = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "height": 128, "width": 128}
        images.append(pipe(scene.prompt(), generator=generator, **settings).images[0])
    share = judge.agreement(images, scenes)
    return {name: share[name] for name in ATTRIBUTES}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    checkpoint = Path(args.weights)
    data = write_image_folder(workdir / "data", list(examples(args.num_images, seed=args.seed + 7)))
    lora_file = distill(checkpoint, data, workdir / "lora", args)
    scenes = sample_scenes(args.num_prompts, seed=args.seed + 1)
    pipe = load_pipeline(checkpoint, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_checker = None
    served = pipe.scheduler
    out = {"teacher (25 steps)": adherence(pipe, scenes, steps=25, guidance_scale=7.5)}
    pipe.scheduler = lcm_scheduler(dict(served.config), 50)
    out["plain (4 LCM steps)"] = adherence(pipe, scenes, steps=4, guidance_scale=1.0)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="distilled")
    out["student (4 LCM steps)"] = adherence(pipe, scenes, steps=4, guidance_scale=1.0)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(REPO / TOY_WEIGHTS), help="the toy checkpoint (default: toy/weights)")
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--w_min", type=float, default=4.0, help="guidance w sampled per example (CFG 1 + w)")
    parser.add_argument("--w_max", type=float, default=8.0)
    parser.add_argument("--num_images", type=int, default=800, help="toy-world pictures to distil on")
    parser.add_argument("--num_prompts", type=int, default=24, help="seen prompts judged per side")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.weights) / "model_index.json").is_file():
        print(f"error: `--weights` {args.weights} holds no checkpoint: build the toy one (docs/toy-world.md)")
        return 2
    with tempfile.TemporaryDirectory(prefix="jsd-bench-distill-toy-") as tmp:
        result = run(args, Path(tmp))
    print(f"prompt adherence on {args.num_prompts} seen prompts, after {args.max_train_steps} distillation steps:")
    for name, share in result.items():
        print(f"  {name:22s} " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    teacher, student, plain = (sum(share.values()) for share in result.values())
    print(f"student / teacher {student / max(teacher, 1e-9):.2f}; student - plain {student - plain:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
