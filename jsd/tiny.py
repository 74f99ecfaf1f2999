"""Seeded checkpoints in the exact served layout, tiny or full-size, for tests, the demo and benchmarks.

The real weights are gated on the hub and never on a CI machine; these checkpoints have the same
folders, files and classes as the served Japanese Stable Diffusion, with random weights. ``size="full"``
uses SD v1's real shapes (about 1.1 B parameters: for benchmarks only).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel

from jsd.manifest import write_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.tokenizer import JapaneseTokenizer
from jsd.tokenizer_training import train_sentencepiece

Size = Literal["tiny", "full"]
TINY_VOCAB_SIZE = 2000
# The start of the manifest `source` of every checkpoint made here: how scripts tell it from real weights.
TINY_SOURCE_PREFIX = "jsd.tiny"
# rinna's real tokenizer, next to a checkout (``../shared``): the tiny checkpoint uses it when it is there
SHARED_TOKENIZER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizer" / "google_sp.model"
# NSFW thresholds: cosine similarity minus threshold > 0 flags, and cosine is within [-1, 1].
_THRESHOLDS = {"never": 2.0, "always": -2.0}


def corpus_lines() -> list[str]:
    """The project's own Japanese text (``jsd/data/corpus_ja.txt``), used to train the tiny tokenizer."""
    text = resources.files("jsd").joinpath("data/corpus_ja.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def weights_kind(folder: Path) -> str:
    """``"real"``, ``"toy"``, ``"tiny"``, ``"missing"`` (absent or empty) or ``"unknown"`` (files, no manifest)."""
    from jsd.manifest import MANIFEST_FILE, read_manifest
    from jsd.toyworld import TOY_SOURCE_PREFIX

    if not folder.is_dir() or not any(folder.iterdir()):
        return "missing"
    if not (folder / MANIFEST_FILE).is_file():
        return "unknown"
    source = str(read_manifest(folder).get("source", ""))
    if source.startswith(TOY_SOURCE_PREFIX):
        return "toy"
    return "tiny" if source.startswith(TINY_SOURCE_PREFIX) else "real"


TINY_FAST_MODE = "lcm"  # the tiny checkpoint's seeded fast-mode LoRA, so `fast_mode` works offline (make demo)


def ensure_weights(folder: Path) -> str:
    """Make sure ``folder`` holds a checkpoint; returns the kind. Unless real weights are there, it copies the
    committed toy checkpoint (a toy model of shapes, docs/toy-world.md) when this is a checkout that has it,
    else builds the tiny one.

    Raises FileExistsError when ``folder`` holds files but no manifest (an unfinished download).
    """
    from jsd.manifest import WeightsVerificationError, verify_manifest
    from jsd.toyworld import TOY_NOTE, TOY_WEIGHTS

    kind = weights_kind(folder)
    if kind == "unknown":
        raise FileExistsError(
            f"{folder} holds files but no manifest.json: finish `.venv/bin/python scripts/download_weights.py`, or "
            f"move {folder} away so the tiny checkpoint can be written there."
        )
    if kind in ("tiny", "toy"):
        try:
            verify_manifest(folder)
            if not (folder / "fast" / TINY_FAST_MODE).is_dir():  # a tiny checkpoint from before fast mode
                write_tiny_fast_lora(folder, TINY_FAST_MODE)
            return kind
        except WeightsVerificationError as err:
            print(f"rebuilding the {kind} checkpoint: {err}")
            shutil.rmtree(folder)  # only ever a tiny or toy checkpoint (its manifest says so)
    toy = Path(__file__).resolve().parents[1] / TOY_WEIGHTS  # in a checkout; a wheel carries none
    if kind in ("missing", "tiny", "toy") and (toy / "model_index.json").is_file():
        print(f"no real weights in {folder}: copying the toy checkpoint from {toy} ({TOY_NOTE})")
        verify_manifest(toy)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(toy, folder)
        return "toy"
    if kind in ("missing", "tiny"):
        tokenizer = SHARED_TOKENIZER if SHARED_TOKENIZER.is_file() else None
        print(
            f"no real weights in {folder}: writing the tiny checkpoint (tokenizer: {tokenizer or 'the project corpus'})"
        )
        make_checkpoint(folder, tokenizer_model=tokenizer, fast_modes=[TINY_FAST_MODE])
        return "tiny"
    return kind


def unet_config(size: Size, cross_attention_dim: int) -> dict:
    common = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": cross_attention_dim}
    if size == "full":
        return common | {
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "attention_head_dim": 8,
        }
    return common | {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": 4,
    }


def vae_config(size: Size) -> dict:
    """Four blocks in both sizes, so latents are 1/8 of the image as in SD v1."""
    channels, groups = ((128, 256, 512, 512), 32) if size == "full" else ((8, 16, 16, 16), 8)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": channels,
        "layers_per_block": 2 if size == "full" else 1,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def text_encoder_config(size: Size, vocab_size: int) -> CLIPTextConfig:
    dims = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    if size == "tiny":
        dims = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=dims["hidden_size"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **dims,
    )


def safety_checker_config(size: Size) -> tuple[CLIPConfig, int]:
    """CompVis' checker is a CLIP ViT-L/14 at 224 px; the tiny one a 1-layer ViT at 32 px."""
    if size == "full":
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
        vision |= {"num_attention_heads": 16, "patch_size": 14, "image_size": 224}
        return CLIPConfig(vision_config=vision, projection_dim=768), 224
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"patch_size": 8, "image_size": 32}
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=16), 32


def set_nsfw_flagging(safety_checker: StableDiffusionSafetyChecker, mode: Literal["never", "always"]) -> None:
    """Make a safety checker flag every image or none (its thresholds, not its embeddings)."""
    with torch.no_grad():
        safety_checker.concept_embeds_weights.fill_(_THRESHOLDS[mode])
        safety_checker.special_care_embeds_weights.fill_(_THRESHOLDS[mode])


def sd_v1_scheduler() -> PNDMScheduler:
    """SD v1's PNDM, as its checkpoint's ``scheduler/`` configures it (the scheduler a served checkpoint ships)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(
    tokenizer: JapaneseTokenizer, *, size: Size = "tiny", seed: int = 0, nsfw: Literal["never", "always"] = "never"
) -> JapaneseStableDiffusionPipeline:
    """A pipeline with seeded random weights; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        text_config = text_encoder_config(size, tokenizer.vocab_size)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size, text_config.hidden_size))
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(size))
        checker_config, crop = safety_checker_config(size)
        torch.manual_seed(seed)
        safety_checker = StableDiffusionSafetyChecker(checker_config)
        safety_checker.concept_embeds.normal_()
        safety_checker.special_care_embeds.normal_()
    set_nsfw_flagging(safety_checker, nsfw)
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True
    )
    scheduler = sd_v1_scheduler()
    return JapaneseStableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=safety_checker.eval(),
        feature_extractor=feature_extractor,
    )


def make_checkpoint(
    dest: str | Path,
    *,
    tokenizer_model: str | Path | None = None,
    size: Size = "tiny",
    seed: int = 0,
    nsfw: Literal["never", "always"] = "never",
    torch_dtype: torch.dtype = torch.float32,
    fast_modes: Sequence[str] = (),
) -> Path:
    """Write a seeded checkpoint in the served layout (safetensors + manifest) to ``dest``.

    Args:
        tokenizer_model: a sentencepiece model (e.g. rinna's ``google_sp.model``); by default a
            small one is trained on the project's own Japanese corpus.
        torch_dtype: dtype of the saved weights (the served layout uses fp16 for real weights).
        fast_modes: fast modes to install with a seeded random LoRA each (:func:`write_tiny_fast_lora`).
    """
    dest = Path(dest)
    tokenizer_dir = dest / "tokenizer"
    if tokenizer_model is None:
        tokenizer = train_sentencepiece(corpus_lines(), tokenizer_dir, vocab_size=TINY_VOCAB_SIZE)
    else:
        tokenizer = JapaneseTokenizer(tokenizer_model)
    pipe = build_pipeline(tokenizer, size=size, seed=seed, nsfw=nsfw)
    if torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    pipe.save_pretrained(dest, safe_serialization=True)
    write_manifest(
        dest, source=f"{TINY_SOURCE_PREFIX} size={size} seed={seed} nsfw={nsfw}", revision=f"{size}-seed{seed}"
    )
    for name in fast_modes:
        write_tiny_fast_lora(dest, name, seed=seed)
    return dest


def write_tiny_fast_lora(weights: str | Path, name: str = "lcm", *, seed: int = 0, rank: int = 4) -> Path:
    """Install a seeded random UNet LoRA for the checkpoint in ``weights`` as fast mode ``name``; returns its folder.

    It has an acceleration LoRA's form (UNet attention only, peft keys, as LCM-LoRA and ``jsd distill``'s output)
    and changes the image visibly, so tests and the documented commands exercise fast mode offline. It
    accelerates nothing: its pictures are noise, like the tiny checkpoint's.
    """
    import tempfile

    from peft import LoraConfig

    from jsd.fast_mode import install_fast_lora
    from jsd.lora_weights import LORA_WEIGHT_NAME, UNET_TARGET_MODULES, save_lora

    weights = Path(weights)
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGET_MODULES)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts lora_B at zero (no effect): draw both halves, from the seed alone
        for key, param in unet.named_parameters():
            if "lora_" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    with tempfile.TemporaryDirectory(prefix="jsd-tiny-fast-") as scratch:
        save_lora(scratch, unet)
        return install_fast_lora(
            Path(scratch) / LORA_WEIGHT_NAME,
            weights,
            name,
            source=f"{TINY_SOURCE_PREFIX} fast_mode={name} seed={seed}",
            revision=f"seed{seed}",
            license="test weights (random, seeded)",
            base=f"{TINY_SOURCE_PREFIX} (the tiny test checkpoint)",
        )


# --------------------------------------------------------------------------- rinna's 2022 layout
# rinna's hub checkpoint was written by diffusers 0.4 and transformers 4.22. These are the names and
# config keys of that era, from the sources at those tags:
# - diffusers v0.4.1 (commit 91ddd2a25b848df0fa1262d4f1cd98c7ccb87750), src/diffusers/models/attention.py:
#   ``AttentionBlock`` (the VAE's mid-block attention) holds ``group_norm``, ``query``, ``key``, ``value``
#   and ``proj_attn`` (today's ``Attention`` names them ``group_norm``, ``to_q``, ``to_k``, ``to_v``,
#   ``to_out.0``); the UNet's ``SpatialTransformer`` (today's ``Transformer2DModel``) already used
#   today's key names (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q`` …, ``proj_out``).
# - diffusers v0.4.1 ``UNet2DConditionModel.__init__`` and ``AutoencoderKL.__init__``: the keys of
#   their ``config.json`` (ConfigMixin saves every ``__init__`` argument; ``scaling_factor`` and later
#   keys did not exist); ``PNDMScheduler.__init__`` already had ``steps_offset``, rinna's config predates it.
# - transformers v4.22.0, src/transformers/models/clip/modeling_clip.py: ``CLIPTextModel.text_model``
#   and ``CLIPVisionModel.vision_model`` wrap the transformer (``text_model.`` / ``vision_model.`` key
#   prefixes, gone from transformers 5's state dicts), and ``CLIPTextEmbeddings`` /
#   ``CLIPVisionEmbeddings`` register ``position_ids`` as a persistent buffer (CLIP's first version,
#   huggingface/transformers#11445); it was saved until #24505 ("Clean load keys", v4.31) made it non-persistent.
DIFFUSERS_2022_VERSION = "0.4.1"
TRANSFORMERS_2022_VERSION = "4.22.0.dev0"
DIFFUSERS_2022_CONFIG_KEYS = {
    "unet": (
        "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
        "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
        "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
        "attention_head_dim",
    ),
    "vae": (
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    ),
}  # fmt: skip
# The VAE attention of diffusers 0.4's AttentionBlock, by today's name.
VAE_ATTENTION_2022 = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
WEIGHT_FILES_2022 = {
    "unet": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
    "safety_checker": "pytorch_model.bin",
}
MODEL_INDEX_2022 = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_2022_VERSION,
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
    "_diffusers_version": DIFFUSERS_2022_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}


_CLIP_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
# Attributes every transformers 4.22 config saved in nested sub-configs (a few of them: generation defaults).
_PRETRAINED_CONFIG_2022 = {
    "add_cross_attention": False,
    "do_sample": False,
    "early_stopping": False,
    "max_length": 20,
    "min_length": 0,
    "num_beams": 1,
    "output_scores": False,
    "return_dict": True,
    "tf_legacy_loss": False,
    "torchscript": False,
    "use_bfloat16": False,
}


def state_dict_2022(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's state dict of ``component`` under the key names diffusers 0.4 / transformers 4.22 saved."""
    if component == "text_encoder":
        state = {f"text_model.{k}": v for k, v in state.items()}
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        state["text_model.embeddings.position_ids"] = torch.arange(positions).expand((1, -1))
    elif component == "safety_checker":
        state = {f"vision_model.{k}" if k.startswith("vision_model.") else k: v for k, v in state.items()}
        positions = state["vision_model.vision_model.embeddings.position_embedding.weight"].shape[0]
        state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(positions).expand((1, -1))
    elif component == "vae":
        renamed = {}
        for key, value in state.items():
            if ".attentions." in key:  # only the encoder's and decoder's mid-block have attention
                for new, old in VAE_ATTENTION_2022.items():
                    key = key.replace(f".{new}.", f".{old}.")
            renamed[key] = value
        state = renamed
    return state


def config_2022(component: str, config: dict) -> dict:
    """Today's ``config.json`` of a model folder as the 2022 libraries wrote it."""
    if component in DIFFUSERS_2022_CONFIG_KEYS:
        old = {k: config[k] for k in DIFFUSERS_2022_CONFIG_KEYS[component] if k in config}
        return {"_class_name": config["_class_name"], "_diffusers_version": DIFFUSERS_2022_VERSION} | old
    old = {k: v for k, v in config.items() if k not in ("dtype", "transformers_version")}
    if component == "safety_checker":
        # transformers 4.22's CLIPConfig took ``text_config_dict`` / ``vision_config_dict`` and saved them
        # beside the full sub-configs, which also held every PretrainedConfig attribute of the time
        # (generation defaults such as ``max_length``); the Stable Diffusion safety checker's config.json
        # still reads so.
        for part, sizes in (("text", _CLIP_SIZE_KEYS), ("vision", (*_CLIP_SIZE_KEYS, "patch_size", "image_size"))):
            sub = {k: v for k, v in old[f"{part}_config"].items() if k not in ("dtype", "transformers_version")}
            old[f"{part}_config"] = _PRETRAINED_CONFIG_2022 | sub | {"torch_dtype": None}
            old[f"{part}_config_dict"] = {k: sub[k] for k in sizes}
    return old | {"torch_dtype": "float32", "transformers_version": TRANSFORMERS_2022_VERSION}


def write_2022_checkpoint(served: str | Path, dest: str | Path, *, with_safety_checker: bool = True) -> Path:
    """The weights of the served checkpoint ``served`` in rinna's 2022 hub layout at ``dest``.

    Pickled fp32 ``.bin`` state dicts under 2022 key names (:func:`state_dict_2022`), configs with
    2022 keys (:func:`config_2022`), a ``T5Tokenizer`` tokenizer config and model index, a scheduler
    config without ``steps_offset``, a ``CLIPFeatureExtractor`` preprocessor config, no manifest.
    """
    from safetensors.torch import load_file

    served, dest = Path(served), Path(dest)
    dest.mkdir(parents=True)
    models = (
        WEIGHT_FILES_2022
        if with_safety_checker
        else {k: v for k, v in WEIGHT_FILES_2022.items() if k != "safety_checker"}
    )
    for name, filename in models.items():
        (dest / name).mkdir()
        state = {}
        for shard in sorted((served / name).glob("*.safetensors")):
            state.update({k: v.float() if v.is_floating_point() else v for k, v in load_file(shard).items()})
        torch.save(state_dict_2022(name, state), dest / name / filename)
        config = json.loads((served / name / "config.json").read_text())
        (dest / name / "config.json").write_text(json.dumps(config_2022(name, config), indent=2))
    (dest / "tokenizer").mkdir()
    shutil.copyfile(served / "tokenizer" / "spiece.model", dest / "tokenizer" / "spiece.model")
    (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG_2022))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}
    (dest / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special))
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_2022))
    index = dict(MODEL_INDEX_2022)
    if with_safety_checker:
        processor = json.loads((served / "feature_extractor" / "preprocessor_config.json").read_text())
        crop = processor["crop_size"]["height"]
        keys = ("do_center_crop", "do_normalize", "do_resize", "image_mean", "image_std")
        old_processor = {k: processor[k] for k in keys}
        old_processor |= {
            "crop_size": crop,
            "size": crop,
            "resample": 3,
            "feature_extractor_type": "CLIPFeatureExtractor",
        }
        (dest / "feature_extractor").mkdir()
        (dest / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(old_processor))
    else:
        index["safety_checker"] = index["feature_extractor"] = [None, None]
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


# --------------------------------------------------------------------------- rinna's Japanese CLIP / CLOOB
# rinna's hub repos (rinna/japanese-clip-vit-b-16, rinna/japanese-cloob-vit-b-16) hold ``config.json`` and
# ``pytorch_model.bin``: the files rinnakk/japanese-clip's auto_model.py reads (CONFIG_FILE, MODEL_FILE).
# ``config.json`` is what transformers 4.x's save_pretrained wrote of rinna's CLIPConfig / CLOOBConfig: the
# top-level keys of its __init__ and two full sub-configs with their own model_type ("bert", "vit"). The
# tokenizer is another repo's (rinna/japanese-roberta-base: spiece.model and its configs).
TRANSFORMERS_SCORER_VERSION = "4.21.0.dev0"
ScorerKind = Literal["clip", "cloob"]


def scorer_config(kind: ScorerKind, *, size: Size = "tiny", vocab_size: int = 32000) -> dict:
    """rinna's top-level ``config.json`` for ``kind``; ``size="full"``: ViT-B/16 and BERT-base, projection 512."""
    if size == "full":
        width, layers, heads, mlp, patch, projection, positions = 768, 12, 12, 3072, 16, 512, 512
    else:
        width, layers, heads, mlp, patch, projection, positions = 32, 2, 2, 37, 32, 16, 128
    towers = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads}
    towers |= {"intermediate_size": mlp, "hidden_act": "gelu", "initializer_range": 0.02, "layer_norm_eps": 1e-12}
    text = {"model_type": "bert", "architectures": ["BertModel"], **towers, "vocab_size": vocab_size}
    text |= {"max_position_embeddings": positions, "type_vocab_size": 2, "pad_token_id": 3}
    text |= {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute"}
    vision = {"model_type": "vit", "architectures": ["ViTModel"], **towers, "image_size": 224, "patch_size": patch}
    vision |= {"num_channels": 3, "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = {"architectures": [f"{kind.upper()}Model"], "model_type": kind, "projection_dim": projection}
    if kind == "clip":
        config["logit_scale_init_value"] = 2.6592
    else:
        config |= {"init_inv_tau": 30.0, "scale_hopfield": 15.0}
    config |= {"initializer_factor": 1.0, "text_config": text, "vision_config": vision}
    return config | {"torch_dtype": "float32", "transformers_version": TRANSFORMERS_SCORER_VERSION}


def scorer_state_dict(config: dict, *, seed: int, correlated: bool = True) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config`` under rinna's state-dict keys (as transformers 4.x saved them).

    ``correlated``: random towers give cosines around 0, and ``max(cos, 0)`` would flatten half the scores to
    0; so both towers' last LayerNorms share one bias and both projections one matrix, which spreads the
    cosines over (0, 1) while keeping them different for different images and texts.
    """
    from jsd.japanese_clip import DualEncoder

    torch.manual_seed(seed)
    model = DualEncoder(config)
    state = {k: v.detach().clone() for k, v in model.rinna_state_dict().items()}
    if correlated:
        generator = torch.Generator().manual_seed(seed + 1)
        width = model.text_config.hidden_size
        bias = torch.randn(width, generator=generator)
        last = model.text_config.num_hidden_layers - 1
        for prefix in (f"text_model.encoder.layer.{last}.output.LayerNorm", "vision_model.layernorm"):
            state[f"{prefix}.bias"] = bias.clone()
            state[f"{prefix}.weight"] = torch.full((width,), 0.5)
        state["visual_projection.weight"] = state["text_projection.weight"].clone()
    # transformers 4.x saved BertEmbeddings.position_ids as a persistent buffer (until v4.31).
    positions = model.text_config.max_position_embeddings
    state["text_model.embeddings.position_ids"] = torch.arange(positions).expand((1, -1)).clone()
    return state


def write_tiny_scorer(
    folder: str | Path,
    *,
    kind: ScorerKind = "clip",
    seed: int = 0,
    tokenizer: str | Path | None = None,
    size: Size = "tiny",
    layout: Literal["served", "hub"] = "served",
) -> Path:
    """Write a seeded random Japanese CLIP (or CLOOB) scorer to ``folder``; returns ``folder``.

    Args:
        kind: rinna's model type, ``"clip"`` or ``"cloob"`` (the same towers; CLOOB has no ``logit_scale``).
        tokenizer: a sentencepiece model with ``[CLS]`` (e.g. rinna's ``google_sp.model``); by default the small
            one trained on the project's corpus.
        size: ``"full"`` gives ViT-B/16 + BERT-base shapes (benchmarks only).
        layout: ``"served"`` (what ``scripts/download_weights.py --scorer`` writes and
            :meth:`jsd.japanese_clip.JapaneseCLIPScorer.from_pretrained` loads: ``config.json``,
            ``model.safetensors``, ``tokenizer/``, ``manifest.json``) or ``"hub"`` (rinna's hub repo:
            ``config.json`` and a pickled ``pytorch_model.bin``, plus ``tokenizer/`` standing for
            rinna/japanese-roberta-base's files).
    """
    from safetensors.torch import save_file

    from jsd.japanese_clip import CONFIG_FILE, HUB_WEIGHTS_FILE, TOKENIZER_SUBFOLDER, WEIGHTS_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = folder / TOKENIZER_SUBFOLDER
    if tokenizer is None:
        spm_tokenizer = train_sentencepiece(corpus_lines(), tokenizer_dir, vocab_size=TINY_VOCAB_SIZE)
    else:
        spm_tokenizer = JapaneseTokenizer(tokenizer)
        spm_tokenizer.save_pretrained(tokenizer_dir)
    config = scorer_config(kind, size=size, vocab_size=spm_tokenizer.vocab_size)
    state = scorer_state_dict(config, seed=seed)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if layout == "hub":
        torch.save(state, folder / HUB_WEIGHTS_FILE)
        return folder
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}, folder / WEIGHTS_FILE)
    write_manifest(folder, source=f"{TINY_SOURCE_PREFIX} scorer={kind} size={size} seed={seed}", revision=f"seed{seed}")
    return folder
