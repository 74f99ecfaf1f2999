"""The one place that reads a checkpoint: rinna's 2022 layout or the served (safetensors) layout.

Each component is loaded explicitly by its known class; the class names in ``model_index.json`` are
not trusted (rinna's names ``T5Tokenizer``, which transformers 5 no longer builds correctly).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel, schedulers
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessorPil, CLIPTextModel

from jsd.manifest import MANIFEST_FILE
from jsd.notices import no_loading_bars
from jsd.tokenizer import JapaneseTokenizer

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "rinna/japanese-stable-diffusion"
MODEL_INDEX = "model_index.json"
MODEL_FOLDERS = ("unet", "vae", "text_encoder", "safety_checker")
# Everything a pipeline needs; safety_checker and feature_extractor are optional.
COMPONENT_FOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "safety_checker", "feature_extractor")


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is; a hub repo id downloaded (or found in the cache) with ``token``."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/")) or str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(f"Checkpoint folder {str(path_or_repo_id)!r} does not exist.")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(str(path_or_repo_id), token=token, revision=revision, local_files_only=local_files_only)
    )


def has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def load_components(
    folder: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    use_safetensors: bool | None = None,
    load_safety_checker: bool = True,
) -> dict:
    """Build every pipeline component from a local checkpoint folder.

    Args:
        folder: a diffusers-layout folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` …).
        torch_dtype: dtype of the models (``None`` keeps what the files hold).
        use_safetensors: ``True`` refuses pickled weights; ``None`` means ``True`` for a served folder
            (one with a ``manifest.json``) and otherwise uses safetensors where a component has them,
            loading ``.bin`` files with ``weights_only`` unpickling (rinna's 2022 layout).
        load_safety_checker: ``False`` skips the safety checker and its feature extractor.
    """
    folder = Path(folder)
    _require_folders(folder, ("tokenizer", "text_encoder", "unet", "vae", "scheduler"))
    if use_safetensors is None and (folder / MANIFEST_FILE).is_file():
        use_safetensors = True  # served folders never unpickle anything
    with no_loading_bars():  # transformers draws one per model: two log lines a user cannot act on
        kw = {"torch_dtype": torch_dtype}
        components = {
            "tokenizer": JapaneseTokenizer.from_pretrained(folder / "tokenizer"),
            "text_encoder": CLIPTextModel.from_pretrained(
                folder / "text_encoder", dtype=torch_dtype, **_weights_kwargs(folder / "text_encoder", use_safetensors)
            ),
            "unet": UNet2DConditionModel.from_pretrained(
                folder / "unet", **kw, **_weights_kwargs(folder / "unet", use_safetensors)
            ),
            "vae": AutoencoderKL.from_pretrained(
                folder / "vae", **kw, **_weights_kwargs(folder / "vae", use_safetensors)
            ),
            "scheduler": load_scheduler(folder / "scheduler"),
            "safety_checker": None,
            "feature_extractor": None,
        }
        if load_safety_checker and (folder / "safety_checker").is_dir():
            components["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
                folder / "safety_checker",
                dtype=torch_dtype,
                **_weights_kwargs(folder / "safety_checker", use_safetensors),
            )
            components["feature_extractor"] = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor")
    return components


def load_scheduler(folder: Path):
    """The checkpoint's scheduler, with 2022 configs brought up to date (``steps_offset=1`` for SD v1)."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(schedulers, config.get("_class_name", ""), None) or PNDMScheduler
    config.setdefault("steps_offset", 1)  # rinna's config predates the key; SD v1 was trained with 1
    return cls.from_config(config)


def _weights_kwargs(folder: Path, use_safetensors: bool | None) -> dict:
    if use_safetensors is None:
        use_safetensors = has_safetensors(folder)
    if use_safetensors and not has_safetensors(folder):
        raise FileNotFoundError(
            f"No .safetensors weights in {folder}: served checkpoints hold safetensors only "
            "(convert with scripts/download_weights.py)."
        )
    return {"use_safetensors": use_safetensors, "local_files_only": True}


def _require_folders(folder: Path, names: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    missing = [n for n in names if not (folder / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Checkpoint folder {folder} lacks {', '.join(missing)}/: expected the diffusers layout "
            f"({', '.join(COMPONENT_FOLDERS)})."
        )
