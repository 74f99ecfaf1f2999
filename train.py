"""Cog trainer (cog.yaml ``train: train.py:train``): a zip of images with Japanese captions → a LoRA .tar.

On Replicate: ``POST /v1/models/{owner}/{name}/versions/{version}/trainings`` with these inputs (see
docs/train-on-replicate.md); the trained version then runs ``predict.py`` with ``COG_WEIGHTS`` = this .tar.
Locally, without Docker::

    .venv/bin/python scripts/cog_local.py train -i input_images=@data.zip -i max_train_steps=500 -o out/

The logic lives in :func:`jsd.training.lora_run.train_lora_archive`; this file only maps Cog's inputs and
output onto it. (``scripts/train.py`` is the other trainer: full two-stage fine-tuning from the command line.)
"""

from __future__ import annotations

import functools
import logging
import os
import secrets

from cog import BaseModel, Input, Path

from jsd import scratch
from jsd.training import archive
from jsd.training.lora_run import LoraTrainingSettings, train_lora_archive

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is local (JSD_WEIGHTS, default weights/)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger("jsd.train")
RESOLUTIONS = [128, 256, 384, 512, 640, 768]  # 128: the smallest served size (the toy model's)


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(  # noqa: B008 (Cog reads inputs from the defaults)
        description="A .zip or .tar of images (jpg, png, webp, bmp) with captions: metadata.jsonl "
        '({"file_name": "0001.png", "text": "…"} per line), captions.csv (file_name, caption) or a .txt per '
        f"image, in that order of precedence. At most {archive.MAX_MEMBERS:,} files, "
        f"{archive.MAX_ARCHIVE_BYTES >> 30} GiB packed, {archive.MAX_TOTAL_BYTES >> 30} GiB unpacked.",
    ),
    caption_prefix: str = Input(
        description="Put before every caption, e.g. a trigger phrase such as 'jsdスタイルの絵、'.",
        max_length=200,
        default="",
    ),
    max_train_steps: int = Input(description="Optimizer steps.", ge=1, le=10_000, default=1000),
    learning_rate: float = Input(
        description="AdamW learning rate of the LoRA weights.", ge=1e-6, le=1e-2, default=1e-4
    ),
    lora_rank: int = Input(
        description="LoRA rank: larger learns more detail, and the file grows.", ge=1, le=128, default=16
    ),
    train_text_encoder: bool = Input(
        description="Also train LoRA layers on the Japanese text encoder (else the UNet only).", default=False
    ),
    resolution: int = Input(
        description="Training images are resized (shorter side) and center-cropped to this square size.",
        choices=RESOLUTIONS,
        default=512,
    ),
    train_batch_size: int = Input(description="Images per step.", ge=1, le=16, default=2),
    min_clip_score: float | None = Input(
        description="Drop image-caption pairs whose Japanese CLIP score (0-100) is below this before training, as "
        "rinna cleaned their data; every dropped pair is listed with its score in training.json. Empty: keep all.",
        ge=0,
        le=100,
        default=None,
    ),
    validation_prompts: str = Input(
        description="Prompts, one per line, generated at the end of the training (prompt i at seed + i); the images "
        "go into the output .tar (validation/) and their Japanese CLIP scores into training.json.",
        max_length=4000,
        default="",
    ),
    seed: int | None = Input(
        description="Seed of the run (data order, noise): the same seed, data and settings train the same LoRA. "
        "Leave empty for a random one.",
        ge=0,
        le=2**31 - 1,
        default=None,
    ),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = _output_dir()
    for old in output_dir.iterdir():  # the previous training's .tar: Cog has read it by now
        old.unlink()
    settings = LoraTrainingSettings(
        caption_prefix=caption_prefix,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        train_text_encoder=train_text_encoder,
        resolution=resolution,
        train_batch_size=train_batch_size,
        seed=secrets.randbits(31) if seed is None else seed,
        min_clip_score=min_clip_score,
        validation_prompts=[line.strip() for line in validation_prompts.splitlines() if line.strip()],
    )
    logger.info("Seed %d", settings.seed)
    tar = output_dir / "jsd-lora.tar"
    info = train_lora_archive(
        input_images,
        tar,
        settings,
        base_model=os.environ.get("JSD_WEIGHTS", "weights"),
        filename=archive.upload_name(input_images),  # the user's file name, not Cog's temporary copy
    )
    data = info["data"]
    logger.info(
        "Trained on %d images (%d skipped) in %.0f s", data["images_used"], len(data["skipped"]), info["wall_seconds"]
    )
    return TrainingOutput(weights=Path(tar))


@functools.cache
def _output_dir() -> Path:
    """This process's folder for the trained .tar (trainings run one at a time), removed when it exits."""
    return Path(scratch.process_folder("jsd-training-"))
