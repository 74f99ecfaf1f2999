"""LoRA adapters for the trainer (``--lora_rank``): peft adapters on the frozen UNet (and text encoder).

This module sits below :mod:`jsd.training.trainer` (which calls it) and imports nothing of the trainer's; the
whole training run from a user's archive sits above the trainer, in :mod:`jsd.training.lora_run`.
What differs from full fine-tuning lives here; data, loss, loop and checkpoints are the trainer's own:

* :func:`add_lora_adapters` — ``add_adapter(LoraConfig(...))`` on the frozen modules, as diffusers'
  ``train_text_to_image_lora.py`` (UNet attention) and ``train_dreambooth_lora.py`` (text encoder
  attention) do, with ``lora_alpha = rank`` (scale 1: the kohya file's ``.alpha`` is the rank too);
* :func:`register_lora_checkpointing` — accelerate save/load hooks so that ``checkpoint-N/`` holds the
  adapters only (a few MB), not the frozen model (GBs), and a resumed run restores them exactly;
* :func:`export_lora` — ``lora.safetensors`` + ``lora_kohya.safetensors`` (:func:`jsd.lora_weights.save_lora`)
  and ``training.json``, written atomically into ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from jsd.lora_weights import (
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


def add_lora_adapters(
    components: dict,
    names: tuple[str, ...],
    *,
    rank: int,
    seed: int,
    target_modules: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, torch.nn.Module]:
    """Add a trainable rank-``rank`` LoRA adapter to each of ``names``; returns those modules (train mode).

    ``target_modules`` per module name (default :data:`TARGET_MODULES`: attention only); LCM-LoRA distillation
    targets convolutions and feed-forward layers too.

    The modules must already be frozen (``requires_grad`` off, in the weight dtype): only the adapters train,
    and they are kept in fp32 (diffusers' ``cast_training_params``) whatever the frozen weights' dtype.
    The random initialisation is drawn from ``seed`` (the global RNG is left as it was): a run is reproducible.
    """
    trained = {}
    for name in names:
        module = components[name]
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=list((target_modules or {}).get(name, TARGET_MODULES[name])),
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


def export_lora(
    output_dir: Path, trained: dict[str, torch.nn.Module], info: dict, *, weight_name: str | None = None
) -> Path:
    """Write ``lora.safetensors`` (or ``weight_name``), ``lora_kohya.safetensors`` and ``training.json``
    into ``output_dir`` atomically."""
    staging = output_dir.parent / f".{output_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_lora(staging, trained["unet"], trained.get("text_encoder"), weight_name=weight_name or LORA_WEIGHT_NAME)
    (staging / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    swap_into_place(staging, output_dir)
    return output_dir
