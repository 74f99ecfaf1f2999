"""One LoRA training from a user's archive to the trainer's ``.tar`` (what Cog's ``train.py`` runs).

This sits above :mod:`jsd.training.trainer`: archive → image folder (:mod:`jsd.training.archive`) →
:func:`jsd.training.trainer.train` with ``--lora_rank`` (its adapters: :mod:`jsd.training.adapters`) → a
``.tar`` of ``lora.safetensors``, ``lora_kohya.safetensors`` and ``training.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jsd import clip_filter
from jsd.clip_filter import check_threshold
from jsd.japanese_clip import SCORER_FOLDER, scorer_folder
from jsd.lora_weights import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, TRAINING_INFO_NAME
from jsd.manifest import verify_manifest
from jsd.training.archive import log_skipped, prepare_dataset
from jsd.training.clip_score import FILTER_FOLDER, UserNames
from jsd.training.config import TrainConfig
from jsd.training.trainer import train

logger = logging.getLogger(__name__)
# The Japanese CLIP filter's outputs that go into the .tar, under clip_filter/ (the scores cache stays out)
FILTER_FILES = (clip_filter.KEPT_FILE, clip_filter.DROPPED_FILE, clip_filter.REPORT_FILE, clip_filter.HISTOGRAM_FILE)


@dataclass
class LoraTrainingSettings:
    """The choices of one LoRA training (the Cog trainer's inputs); everything else is the trainer's default."""

    caption_prefix: str = ""
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    lora_rank: int = 16
    train_text_encoder: bool = False
    resolution: int = 512
    train_batch_size: int = 2
    seed: int = 0
    min_clip_score: float | None = None  # drop pairs scored below it (the base model's japanese_clip/ scores)
    validation_prompts: list[str] = dataclasses.field(default_factory=list)  # images + scores at the last step


def train_lora_archive(
    archive: str | os.PathLike,
    output_tar: str | os.PathLike,
    settings: LoraTrainingSettings,
    *,
    base_model: str | os.PathLike,
    name: str = "input_images",
    filename: str | None = None,
) -> dict:
    """Train a LoRA on the images and captions of ``archive``; write ``output_tar`` and return ``training.json``.

    ``base_model``: the served checkpoint folder (verified against its manifest first). The .tar holds
    ``lora.safetensors``, ``lora_kohya.safetensors`` and ``training.json`` (settings, data counts, skipped files).
    Raises :class:`jsd.training.archive.DatasetError` (naming ``name`` and ``filename``, the user's name for the
    archive: see :func:`jsd.training.archive.prepare_dataset`) for an archive that cannot be used.
    """
    start = time.perf_counter()
    manifest = verify_manifest(base_model)
    _check_scorer_for_filter(settings, Path(base_model))
    with tempfile.TemporaryDirectory(prefix="jsd-lora-") as tmp:
        work = Path(tmp)
        dataset = prepare_dataset(
            archive, work / "data", caption_prefix=settings.caption_prefix, name=name, filename=filename
        )
        logger.info(
            "%s %d of %d images (captions from %s); %d file(s) skipped",
            "Training on" if settings.min_clip_score is None else "Scoring with the Japanese CLIP",
            dataset.images_used,
            dataset.images_found,
            dataset.caption_source,
            len(dataset.skipped),
        )
        log_skipped(dataset.skipped, logger)
        config = TrainConfig(
            pretrained_model_name_or_path=str(base_model),
            train_data_dir=str(dataset.folder),
            output_dir=str(work / "lora"),
            project_dir=str(work / "run"),
            lora_rank=settings.lora_rank,
            train_text_encoder=settings.train_text_encoder,
            resolution=settings.resolution,
            train_batch_size=settings.train_batch_size,
            max_train_steps=settings.max_train_steps,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            lr_warmup_steps=0,  # diffusers' LoRA examples: constant rate; a warm-up would eat short runs
            caption_dropout=0.0,  # a LoRA learns the captioned concept; the base keeps the unconditional branch
            checkpointing_steps=max(settings.max_train_steps, 1),  # one checkpoint, at the end: a run is short
            mixed_precision="fp16" if torch.cuda.is_available() else "no",
            report_to="none",
            min_clip_score=settings.min_clip_score,
            validation_prompts=list(settings.validation_prompts),
            validation_steps=max(settings.max_train_steps, 1),  # once, at the end
        ).validate()
        names = UserNames(
            threshold="min_clip_score",
            data=name,
            scorer=f"min_clip_score`'s scorer, the model weights' `{SCORER_FOLDER}/",
            lists=f"in the output .tar: {', '.join(f'{FILTER_FOLDER}/{f}' for f in FILTER_FILES)}",
        )
        try:
            train(config, names=names)
        finally:
            reset_accelerate()
        info = json.loads((work / "lora" / TRAINING_INFO_NAME).read_text(encoding="utf-8"))
        data = dataset.to_json() | {"records_skipped_in_training": info["skipped"]}
        if "clip_filter" in info:  # the images trained on are those the filter kept
            data |= {
                "images_used": info["clip_filter"]["kept"],
                "images_dropped_by_clip_filter": info["clip_filter"]["dropped"],
            }
            logger.info(
                "Trained on the %d of %d images the Japanese CLIP filter kept (min_clip_score %g)",
                data["images_used"],
                dataset.images_used,
                settings.min_clip_score,
            )
        info = {
            "settings": dataclasses.asdict(settings),
            "base_model": {"source": manifest.get("source"), "revision": manifest.get("revision")},
            "data": data,
            "steps": info["steps"],
            **{key: info[key] for key in ("clip_filter", "validation") if key in info},
            "trainer": {k: v for k, v in info["settings"].items() if not k.endswith(("_dir", "_path"))},
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        (work / "lora" / TRAINING_INFO_NAME).write_text(
            json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        output_tar = Path(output_tar)
        output_tar.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(output_tar, "w") as tar:
            for file in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, TRAINING_INFO_NAME):
                tar.add(work / "lora" / file, arcname=file)
            validation = work / "lora" / "validation"
            for file in sorted(validation.glob("*.png")) if validation.is_dir() else ():
                tar.add(file, arcname=f"validation/{file.name}")  # the last validation images
            lists = work / "run" / FILTER_FOLDER
            for file in FILTER_FILES if lists.is_dir() else ():  # kept/dropped pairs, report, histogram
                tar.add(lists / file, arcname=f"{FILTER_FOLDER}/{file}")
    return info


def _check_scorer_for_filter(settings: LoraTrainingSettings, base_model: Path) -> None:
    """``min_clip_score`` scores with the base model's ``japanese_clip/``: fail before any work without one."""
    if settings.min_clip_score is None:
        return
    check_threshold(settings.min_clip_score, "min_clip_score")
    if not scorer_folder(base_model).is_dir():
        raise ValueError(
            f"`min_clip_score` needs a Japanese CLIP scorer in the model's weights ({SCORER_FOLDER}/), and this "
            "model has none: leave `min_clip_score` empty, or use a version whose weights include the scorer."
        )


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next training in this process starts clean.

    (A Cog server runs every training in one worker process; accelerate's own tests reset it the same way.)
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
