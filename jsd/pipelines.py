"""Japanese Stable Diffusion pipelines: diffusers' Stable Diffusion pipelines with a Japanese front end.

Only the Japanese difference is overridden: prompts are encoded through :mod:`jsd.prompting` (rinna's
sentencepiece ids) and checkpoints are read by :mod:`jsd.loading`. Everything else — checks,
schedulers, the denoising loop, the safety checker — is diffusers' own code.
"""

from __future__ import annotations

import os

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.pipelines import pipeline_loading_utils

from jsd import loading, prompting
from jsd.tokenizer import JapaneseTokenizer

# Teach diffusers' save_pretrained/from_pretrained how to save and load our tokenizer, as it does
# for transformers' tokenizers: model_index.json then names ["jsd", "JapaneseTokenizer"].
_TOKENIZER_METHODS = {JapaneseTokenizer.__name__: ["save_pretrained", "from_pretrained"]}
pipeline_loading_utils.LOADABLE_CLASSES.setdefault("jsd", _TOKENIZER_METHODS)
pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(_TOKENIZER_METHODS)


class JapanesePipelineMixin:
    """Japanese prompt encoding, rinna-layout loading and saving for a Stable Diffusion pipeline."""

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """diffusers' ``encode_prompt``, with the text encoded by the Japanese front end."""
        if prompt_embeds is None:
            prompt_embeds = prompting.encode_texts(
                self.tokenizer, self.text_encoder, _as_list(prompt), device=device, clip_skip=clip_skip
            )
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = _negative_texts(negative_prompt, prompt, prompt_embeds.shape[0])
            negative_prompt_embeds = prompting.encode_texts(self.tokenizer, self.text_encoder, negatives, device=device)
        # diffusers does the rest: dtype, num_images_per_prompt duplication, LoRA scale bookkeeping.
        return super().encode_prompt(
            None,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        token: str | None = None,
        revision: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
        safety_checker: bool | None = True,
        **pipeline_kwargs,
    ):
        """Load rinna's checkpoint layout (or the served layout) from a folder or a hub repo id.

        Args:
            pretrained_model_name_or_path: a local folder, or a hub repo id such as
                ``"rinna/japanese-stable-diffusion"`` (gated: pass ``token``).
            torch_dtype: dtype of the models, e.g. ``torch.float16`` on a GPU.
            use_safetensors: ``True`` refuses pickled weights (served folders); ``None`` prefers
                safetensors and falls back to safe ``weights_only`` unpickling.
            safety_checker: ``False`` or ``None`` loads no safety checker.
        """
        folder = loading.resolve_checkpoint(
            pretrained_model_name_or_path, token=token, revision=revision, local_files_only=local_files_only
        )
        components = loading.load_components(
            folder,
            torch_dtype=torch_dtype,
            use_safetensors=use_safetensors,
            load_safety_checker=bool(safety_checker),
        )
        pipeline_kwargs.setdefault("requires_safety_checker", components["safety_checker"] is not None)
        return cls(**components, **pipeline_kwargs)


class JapaneseStableDiffusionPipeline(JapanesePipelineMixin, StableDiffusionPipeline):
    """Text to image from a Japanese prompt; the same arguments as ``StableDiffusionPipeline``."""


class JapaneseStableDiffusionImg2ImgPipeline(JapanesePipelineMixin, StableDiffusionImg2ImgPipeline):
    """Image to image from a Japanese prompt; the same arguments as ``StableDiffusionImg2ImgPipeline``."""


class JapaneseStableDiffusionInpaintPipeline(JapanesePipelineMixin, StableDiffusionInpaintPipeline):
    """Inpainting from a Japanese prompt. With the 4-channel SD v1 UNet, diffusers blends latents."""


def _as_list(prompt: str | list[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}: {prompt!r}.")


def _negative_texts(negative_prompt, prompt, batch_size: int) -> list[str]:
    """diffusers' rules: none → empty text; one text → shared; a list → one per prompt."""
    if negative_prompt is None:
        return [""] * batch_size
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(
            f"`negative_prompt` should be the same type as `prompt`, but got {type(negative_prompt).__name__} "
            f"!= {type(prompt).__name__}."
        )
    negatives = _as_list(negative_prompt)
    if len(negatives) == 1 and isinstance(negative_prompt, str):
        return negatives * batch_size
    if len(negatives) != batch_size:
        raise ValueError(
            f"`negative_prompt` has batch size {len(negatives)}, but `prompt` has batch size {batch_size}. "
            "Pass one negative prompt per prompt."
        )
    return negatives
