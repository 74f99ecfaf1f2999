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
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from jsd import loading, prompting
from jsd.tokenizer import JapaneseTokenizer

# Teach diffusers' save_pretrained/from_pretrained how to save and load our tokenizer, as it does
# for transformers' tokenizers: model_index.json then names ["jsd", "JapaneseTokenizer"].
_TOKENIZER_METHODS = {JapaneseTokenizer.__name__: ["save_pretrained", "from_pretrained"]}
pipeline_loading_utils.LOADABLE_CLASSES.setdefault("jsd", _TOKENIZER_METHODS)
pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(_TOKENIZER_METHODS)


class JapanesePipelineMixin:
    """Japanese prompt encoding, rinna-layout loading and saving for a Stable Diffusion pipeline."""

    # Prompt options of the call in progress: ``__call__`` sets them, ``encode_prompt`` reads them.
    _prompt_options: tuple[bool, int] = (False, prompting.DEFAULT_MAX_PROMPT_CHUNKS)

    def __call__(
        self,
        *args,
        prompt_weighting: bool = False,
        max_prompt_chunks: int = prompting.DEFAULT_MAX_PROMPT_CHUNKS,
        **kwargs,
    ):
        """diffusers' ``__call__`` (every argument as documented there), plus two keyword-only prompt options.

        Args:
            prompt_weighting: parse ``(text:1.3)`` / ``（テキスト：１．３）`` weights in ``prompt`` and
                ``negative_prompt`` (:func:`jsd.prompting.parse_prompt_weights`). Off by default, so that
                parentheses are plain text as in diffusers.
            max_prompt_chunks: a prompt longer than 76 pieces is encoded in chunks of 77 ids, at most this
                many; pieces past them are dropped with a logged warning (``jsd.tokenize_report`` shows
                them). ``1`` is rinna's original single-sequence truncation.
        """
        if not isinstance(prompt_weighting, bool):
            raise TypeError(f"`prompt_weighting` must be True or False, got {prompt_weighting!r}.")
        options = (prompt_weighting, prompting.check_max_prompt_chunks(max_prompt_chunks))
        previous, self._prompt_options = self._prompt_options, options
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._prompt_options = previous

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
        *,
        prompt_weighting: bool | None = None,
        max_prompt_chunks: int | None = None,
    ):
        """diffusers' ``encode_prompt``, with the text encoded by the Japanese front end (:mod:`jsd.prompting`).

        Prompt and negative prompt are padded to the same number of 77-id chunks. ``prompt_weighting`` and
        ``max_prompt_chunks`` default to the options of the ``__call__`` in progress.
        """
        weighting, max_chunks = self._prompt_options
        options = {
            "prompt_weighting": weighting if prompt_weighting is None else prompt_weighting,
            "max_prompt_chunks": max_chunks if max_prompt_chunks is None else max_prompt_chunks,
        }
        # diffusers' encode_prompt scales the text encoder's LoRA layers by `lora_scale` around its own
        # text-encoder call; ours bypasses that call, so it scales them here the same way
        # (pipeline_stable_diffusion.py: scale_lora_layers ... unscale_lora_layers with the PEFT backend).
        scaled = lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            prompt_embeds, negative_prompt_embeds = self._encode_texts(
                prompt,
                device,
                do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                clip_skip,
                options,
            )
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)
        # diffusers does the rest: dtype, num_images_per_prompt duplication. No `lora_scale`: it would scale
        # and unscale the text encoder around nothing, and remember the scale in `self._lora_scale`, which
        # the next `load_lora_weights` applies to the text encoder it loads.
        return super().encode_prompt(
            None,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )

    def _encode_texts(
        self,
        prompt,
        device,
        do_classifier_free_guidance,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        clip_skip,
        options,
    ):
        """Prompt and negative prompt through :mod:`jsd.prompting`, padded to the same number of chunks."""
        positives = negatives = None
        if prompt_embeds is None:
            positives = self._tokenize(_as_list(prompt), **options)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch_size = len(positives) if positives is not None else prompt_embeds.shape[0]
            negatives = self._tokenize(_negative_texts(negative_prompt, prompt, batch_size), **options)
        if positives is not None or negatives is not None:
            num_chunks = max(
                [r.num_chunks for r in (positives or []) + (negatives or [])]
                + [self._count_chunks(e, name) for e, name in _given(prompt_embeds, negative_prompt_embeds)]
            )
            prompt_embeds = self._embeds(positives, prompt_embeds, num_chunks, device, clip_skip)
            if do_classifier_free_guidance:
                negative_prompt_embeds = self._embeds(negatives, negative_prompt_embeds, num_chunks, device, clip_skip)
        return prompt_embeds, negative_prompt_embeds

    def _tokenize(self, texts: list[str], **options) -> list[prompting.TokenReport]:
        reports = [prompting.tokenize_prompt(self.tokenizer, text, **options) for text in texts]
        for report in reports:
            prompting.warn_truncated(report)
        return reports

    def _count_chunks(self, embeds: torch.Tensor, name: str) -> int:
        length = self.tokenizer.model_max_length
        if embeds.ndim != 3 or embeds.shape[1] % length:
            raise ValueError(
                f"`{name}` has shape {tuple(embeds.shape)}; to pair it with a text prompt its sequence length must "
                f"be a multiple of {length}. Pass both `prompt_embeds` and `negative_prompt_embeds` instead."
            )
        return embeds.shape[1] // length

    def _embeds(self, reports, embeds, num_chunks: int, device, clip_skip: int | None) -> torch.Tensor:
        """Encode ``reports`` in ``num_chunks`` chunks, or pad given ``embeds`` with empty-text chunks."""
        if reports is not None:
            return prompting.encode_reports(
                self.tokenizer, self.text_encoder, reports, num_chunks=num_chunks, device=device, clip_skip=clip_skip
            )
        missing = num_chunks - embeds.shape[1] // self.tokenizer.model_max_length
        if missing == 0:
            return embeds
        empty = prompting.tokenize_prompt(self.tokenizer, "")
        pad = prompting.encode_reports(
            self.tokenizer, self.text_encoder, [empty], num_chunks=missing, device=device, clip_skip=clip_skip
        )
        pad = pad.to(device=embeds.device, dtype=embeds.dtype).expand(embeds.shape[0], -1, -1)
        return torch.cat([embeds, pad], dim=1)

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


def _given(prompt_embeds, negative_prompt_embeds):
    """The embeddings a caller passed, with their argument names."""
    pairs = ((prompt_embeds, "prompt_embeds"), (negative_prompt_embeds, "negative_prompt_embeds"))
    return [(embeds, name) for embeds, name in pairs if embeds is not None]


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
