"""LoRA mode of the trainer (``--lora_rank``): peft adapters on the frozen UNet (and text encoder).

What differs from full fine-tuning lives here; data, loss, loop and checkpoints are the trainer's own:

* :func:`add_lora_adapters` — ``add_adapter(LoraConfig(...))`` on the frozen modules, as diffusers'
  ``train_text_to_image_lora.py`` (UNet attention) and ``train_dreambooth_lora.py`` (text encoder
  attention) do, with ``lora_alpha = rank`` (scale 1: the kohya file's ``.alpha`` is the rank too);
* :func:`register_lora_checkpointing` — accelerate save/load hooks so that ``checkpoint-N/`` holds the
  adapters only (a few MB), not the frozen model (GBs), and a resumed run restores them exactly;
* :func:`export_lora` — ``lora.safetensors`` + ``lora_kohya.safetensors`` (:func:`jsd.lora.save_lora`)
  and ``training.json``, written atomically into ``output_dir``;
* :func:`train_lora_archive` — one whole training from a user's archive to the trainer's ``.tar``
  (what Cog's ``train.py`` runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from jsd.lora import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    TEXT_ENCODER_TARGET_MODULES,
    TRAINING_INFO_NAME,
    UNET_TARGET_MODULES,
    save_lora,
)
from jsd.manifest import swap_into_place

logger = logging.getLogger(__name__)

TARGET_MODULES = {"unet": UNET_TARGET_MODULES, "text_encoder": TEXT_ENCODER_TARGET_MODULES}
CHECKPOINT_FILE = "lora_adapters.safetensors"  # peft state dicts, "unet."/"text_encoder." prefixed


def add_lora_adapters(components: dict, names: tuple[str, ...], *, rank: int, seed: int) -> dict[str, torch.nn.Module]:
    """Add a trainable rank-``rank`` LoRA adapter to each of ``names``; returns those modules (train mode).

    The modules must already be frozen (``requires_grad`` off, in the weight dtype): only the adapters train,
    and they are kept in fp32 (diffusers' ``cast_training_params``) whatever the frozen weights' dtype.
    The random initialisation is drawn from ``seed`` (the global RNG is left as it was): a run is reproducible.
    """
    trained = {}
    for name in names:
        module = components[name]
        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES[name])
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module.add_adapter(config)
        cast_training_params(module, dtype=torch.float32)
        trained[name] = module.train()
    return trained


def _named(models: list, trained: dict[str, torch.nn.Module], accelerator: Accelerator) -> dict[str, torch.nn.Module]:
    """Which of accelerate's (unwrapped) ``models`` is which trained module."""
    unwrapped = {id(accelerator.unwrap_model(m)): name for name, m in trained.items()}
    return {unwrapped[id(accelerator.unwrap_model(m))]: accelerator.unwrap_model(m) for m in models}


def register_lora_checkpointing(accelerator: Accelerator, trained: dict[str, torch.nn.Module]) -> None:
    """Checkpoints hold the adapters only; ``load_state`` puts them back (diffusers' LoRA scripts' hooks)."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = {}
            for name, module in _named(models, trained, accelerator).items():
                state |= {f"{name}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(module).items()}
            save_file(state, Path(output_dir) / CHECKPOINT_FILE)
        weights.clear()  # the frozen model is not saved again with every checkpoint

    def load_hook(models: list, input_dir: str) -> None:
        state = load_file(Path(input_dir) / CHECKPOINT_FILE)
        for name, module in _named(models, trained, accelerator).items():
            own = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
            result = set_peft_model_state_dict(module, own)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if result.unexpected_keys or missing or not own:
                raise ValueError(
                    f"{input_dir}/{CHECKPOINT_FILE} does not match the {name} adapters of this run "
                    f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}): resume with the same "
                    "`--lora_rank` and `--train_text_encoder`."
                )
        models.clear()  # loaded here: accelerate must not load model weights over them

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def export_lora(output_dir: Path, trained: dict[str, torch.nn.Module], info: dict) -> Path:
    """Write ``lora.safetensors``, ``lora_kohya.safetensors`` and ``training.json`` into ``output_dir`` atomically."""
    staging = output_dir.parent / f".{output_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_lora(staging, trained["unet"], trained.get("text_encoder"))
    (staging / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    swap_into_place(staging, output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------- one training from an archive
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
) -> dict:
    """Train a LoRA on the images and captions of ``archive``; write ``output_tar`` and return ``training.json``.

    ``base_model``: the served checkpoint folder (verified against its manifest first). The .tar holds
    ``lora.safetensors``, ``lora_kohya.safetensors`` and ``training.json`` (settings, data counts, skipped files).
    Raises :class:`jsd.training.archive.DatasetError` (naming ``name``) for an archive that cannot be used.
    """
    from jsd.manifest import verify_manifest
    from jsd.training.archive import prepare_dataset
    from jsd.training.config import TrainConfig
    from jsd.training.trainer import train

    start = time.perf_counter()
    manifest = verify_manifest(base_model)
    _check_scorer_for_filter(settings, Path(base_model))
    with tempfile.TemporaryDirectory(prefix="jsd-lora-") as tmp:
        work = Path(tmp)
        dataset = prepare_dataset(archive, work / "data", caption_prefix=settings.caption_prefix, name=name)
        logger.info(
            "Training on %d of %d images (captions from %s); %d file(s) skipped",
            dataset.images_used,
            dataset.images_found,
            dataset.caption_source,
            len(dataset.skipped),
        )
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
        try:
            train(config)
        finally:
            reset_accelerate()
        info = json.loads((work / "lora" / TRAINING_INFO_NAME).read_text(encoding="utf-8"))
        info = {
            "settings": dataclasses.asdict(settings),
            "base_model": {"source": manifest.get("source"), "revision": manifest.get("revision")},
            "data": dataset.to_json() | {"records_skipped_in_training": info["skipped"]},
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
    return info


def _check_scorer_for_filter(settings: LoraTrainingSettings, base_model: Path) -> None:
    """``min_clip_score`` scores with the base model's ``japanese_clip/``: fail before any work without one."""
    from jsd.clip_filter import check_threshold
    from jsd.japanese_clip import SCORER_FOLDER

    if settings.min_clip_score is None:
        return
    check_threshold(settings.min_clip_score, "min_clip_score")
    if not (base_model / SCORER_FOLDER).is_dir():
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
