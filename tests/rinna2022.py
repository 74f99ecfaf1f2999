"""Write a fake checkpoint in rinna's 2022 layout from a served (tiny) one, as the hub holds it.

Pickled fp32 ``.bin`` weights with 2022 key names (``text_model.`` and ``vision_model.vision_model.``
prefixes, ``position_ids`` buffers, the VAE's ``query``/``key``/``value``/``proj_attn``), configs
written by diffusers 0.4 / transformers 4.22, a ``T5Tokenizer`` tokenizer config and model index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from jsd.loading import load_components

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
    "safety_checker": "pytorch_model.bin",
}
MODEL_INDEX_2022 = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.4.1",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TOKENIZER_CONFIG_2022 = {
    "tokenizer_class": "T5Tokenizer",
    "do_lower_case": True,
    "model_max_length": 77,
    "pad_token": "[PAD]",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "extra_ids": 0,
    "additional_special_tokens": [],
    "sp_model_kwargs": {},
}
SCHEDULER_2022 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.4.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}


def state_dict_2022(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's keys renamed to what 2022's diffusers/transformers saved."""
    if name == "text_encoder":
        state = {f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    elif name == "safety_checker":
        state = {f"vision_model.{k}" if k.startswith("vision_model.") else k: v for k, v in state.items()}
        positions = state["vision_model.vision_model.embeddings.position_embedding.weight"].shape[0]
        state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    elif name == "vae":
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        renamed = {}
        for key, value in state.items():
            for new, legacy in old.items():
                key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{legacy}.")
            renamed[key] = value
        state = renamed
    return state


def _old_config(path: Path, diffusers: bool) -> None:
    config = json.loads(path.read_text())
    if diffusers:
        config["_diffusers_version"] = "0.4.1"
    else:
        config.pop("dtype", None)
        config |= {"transformers_version": "4.22.0.dev0", "torch_dtype": "float32"}
    path.write_text(json.dumps(config, indent=2))


def write_2022_checkpoint(served: Path, dest: Path) -> Path:
    """rinna's 2022 layout at ``dest``, holding the weights of the served checkpoint ``served``."""
    components = load_components(served, use_safetensors=True)
    dest.mkdir(parents=True)
    for name, filename in WEIGHT_FILES.items():
        (dest / name).mkdir()
        shutil.copyfile(served / name / "config.json", dest / name / "config.json")
        _old_config(dest / name / "config.json", diffusers=name in ("unet", "vae"))
        state = {k: v.float() for k, v in components[name].state_dict().items()}
        torch.save(state_dict_2022(name, state), dest / name / filename)
    (dest / "tokenizer").mkdir()
    shutil.copyfile(served / "tokenizer" / "spiece.model", dest / "tokenizer" / "spiece.model")
    (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG_2022))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}
    (dest / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special))
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_2022))
    processor = json.loads((served / "feature_extractor" / "preprocessor_config.json").read_text())
    crop = processor["crop_size"]["height"]
    old_processor = {
        k: processor[k] for k in ("do_center_crop", "do_normalize", "do_resize", "image_mean", "image_std")
    }
    old_processor |= {"crop_size": crop, "size": crop, "resample": 3, "feature_extractor_type": "CLIPFeatureExtractor"}
    (dest / "feature_extractor").mkdir()
    (dest / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(old_processor))
    (dest / "model_index.json").write_text(json.dumps(MODEL_INDEX_2022))
    return dest
