"""Fine-tune Japanese Stable Diffusion, stage 1 (text encoder) or stage 2 (text encoder + UNet).

One GPU:
    accelerate launch scripts/train.py --config configs/train/stage2.json \
        --pretrained_model_name_or_path weights --train_data_dir data/images \
        --output_dir out/stage2 --resolution 512 --train_batch_size 4 --mixed_precision fp16 \
        --gradient_checkpointing --max_train_steps 10000 --checkpointing_steps 500 --resume_from_checkpoint latest
Several GPUs: ``accelerate launch --multi_gpu --num_processes 8 scripts/train.py …`` (or ``torchrun``).
CPU, 2 processes: ``torchrun --standalone --nproc_per_node 2 scripts/train.py …``.
Every flag: ``.venv/bin/python scripts/train.py --help``; the README section "Fine-tuning" has the whole recipe.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    from jsd.training.config import parse_config
    from jsd.training.trainer import train
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    try:
        train(config)
    except (ValueError, FileNotFoundError) as err:  # the trainer's checks name the flag, the value, what is allowed
        remove_if_empty(config.run_dir)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it holds no file (only empty folders): a run stopped by its checks leaves nothing."""
    if not folder.is_dir() or any(path.is_file() for path in folder.rglob("*")):
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir()
    folder.rmdir()


if __name__ == "__main__":
    sys.exit(main())
