"""Serving: one request in, checked images out — the logic behind Cog's ``predict.py`` and ``jsd generate``.

Typical use::

    pipe = load_pipeline("weights")                      # CUDA fp16 if available, else CPU fp32
    generator = ImageGenerator(pipe, model_revision="…")
    result = generator.generate(GenerationRequest(prompt="サラリーマン 油絵", num_outputs=2, seed=42))
    paths = result.save("outputs")                       # PNG/WebP/JPEG with the settings embedded

What a user can rely on:

- every input is checked by :meth:`GenerationRequest.validate` before any model work, and a bad one
  raises :class:`InputError` naming the input, the value and what is allowed;
- ``prompt`` and ``negative_prompt`` hold at most :data:`MAX_PROMPT_CHARS` characters and no control
  characters other than tab, newline and carriage return (they are embedded in every output file's metadata);
- image ``i`` of a request uses its own generator seeded ``seed + i``: the same request gives the same
  images, and ``num_outputs=1`` with ``seed=seed + i`` gives the same picture up to rounding (a batch of one
  takes another arithmetic path: on CPU at most 1 level per pixel before lossy WebP/JPEG encoding);
- a new scheduler is built for every call, so no sampler state leaks from one request into the next;
- NSFW is judged per image: flagged images are dropped, and only a request whose images are all
  flagged fails (:class:`NSFWError`);
- CUDA out-of-memory frees the cache and raises :class:`GenerationError`; the next call works;
- a LoRA (``lora_weights``, or the generator's default one) is loaded for one request and unloaded after
  it: a request without one gets the base model's images bit for bit, and so does ``lora_scale=0``;
- ``num_candidates`` N > 1 (best-of-N, :mod:`jsd.best_of_n`) generates N candidates per returned image, in
  batches within :data:`MAX_PIXELS`, and returns the one the Japanese CLIP scorer ranks highest; it needs a
  scorer (``weights/japanese_clip/``), and N = 1 is the plain generation, bit for bit.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from xml.sax.saxutils import escape

import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from jsd import best_of_n, lora_weights
from jsd.japanese_clip import SCORER_FOLDER, scorer_folder
from jsd.pipelines import (
    JapaneseStableDiffusionImg2ImgPipeline,
    JapaneseStableDiffusionInpaintPipeline,
    JapaneseStableDiffusionPipeline,
)
from jsd.prompting import DEFAULT_MAX_PROMPT_CHUNKS, TokenReport, tokenize_prompt
from jsd.schedulers import DEFAULT_SCHEDULER, check_scheduler_name, make_scheduler

if TYPE_CHECKING:
    from jsd.japanese_clip import JapaneseCLIPScorer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "サラリーマン 油絵"
OUTPUT_FORMATS = ("webp", "png", "jpg")
SIZE_STEP = 64  # SD v1's VAE downsamples by 8 and the UNet by 8 more: sides must be multiples of 64
MIN_SIDE, MAX_SIDE = 128, 1024
MAX_OUTPUTS = 4
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
# `prompt` and `negative_prompt`, in characters. The model reads at most DEFAULT_MAX_PROMPT_CHUNKS (3) chunks of
# 76 pieces: about 400 Japanese characters or 900 of romaji with rinna's tokenizer. 2,000 leaves room for
# weight syntax and spaces while keeping tokenizing (twice: here and in the pipeline), logging and embedding
# the prompt in every output file cheap; a longer prompt would only be truncated anyway.
MAX_PROMPT_CHARS = 2000
# Control characters (C0, DEL, C1) other than tab, newline and carriage return (Windows line ends), and
# unpaired surrogates: they break the XMP metadata of WebP/JPEG outputs (XML 1.0 forbids most of them)
# or cannot be written as UTF-8 at all.
_FORBIDDEN_TEXT_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # not \t \n \r
# What XML 1.0 does not allow in a document; dropped from the XMP packet whatever its source.
_NOT_XML_CHARS = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
MAX_SEED = 2**63 - 1  # a random seed is 63 bits; seed + 3 still fits torch's 64-bit generator
# Pixel budget for one request on a 16 GB T4 (fp16, SDPA attention): the weights take about 2.6 GB
# and the activations of the UNet (classifier-free guidance doubles the batch) and of the VAE decoder
# (it decodes the whole batch at once) grow with width × height × num_outputs. Four 768×768 images
# (2,359,296 pixels) keep the peak well under the T4's 15 GiB usable memory; anything larger
# is refused before it reaches the GPU. Two 1024×1024 images (2,097,152 pixels) fit too.
MAX_PIXELS = 4 * 768 * 768


class InputError(ValueError):
    """A request input is invalid; the message names the input, the value and what is allowed."""


class GenerationError(RuntimeError):
    """Generation failed for a reason the user can act on (out of memory, every image flagged)."""


class NSFWError(GenerationError):
    """Every image of the request was flagged by the safety checker."""


@dataclass
class GenerationRequest:
    """Everything a user chooses for one generation (diffusers' names; Cog's inputs map onto these)."""

    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    num_outputs: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    seed: int | None = None  # None: a random 63-bit seed
    image: str | os.PathLike | Image.Image | None = None  # img2img (or inpaint with ``mask``)
    mask: str | os.PathLike | Image.Image | None = None  # inpaint: white is repainted, black kept
    prompt_strength: float = 0.8  # how much of ``image`` (or the masked area) is replaced
    output_format: str = "webp"
    output_quality: int = 90  # webp/jpg only
    disable_safety_checker: bool = False
    prompt_weighting: bool = True  # parse "(text:1.3)" weights (jsd.prompting), as Cog's input and `jsd generate` do
    lora_weights: str | None = None  # URL, data URI or path of a LoRA (jsd.lora_weights); None: the generator's default
    lora_scale: float = 1.0  # 0: the base model exactly
    num_candidates: int = 1  # best-of-N: candidates per returned image, ranked by the Japanese CLIP scorer

    def validate(self) -> ValidatedRequest:
        """Check every input and decode ``image``/``mask``; raises :class:`InputError` on the first bad one."""
        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        for name in ("width", "height"):
            value = _check_int(name, getattr(self, name), MIN_SIDE, MAX_SIDE)
            if value % SIZE_STEP:
                raise InputError(
                    f"`{name}` must be a multiple of {SIZE_STEP} between {MIN_SIDE} and {MAX_SIDE}, got {value}."
                )
        _check_int("num_outputs", self.num_outputs, 1, MAX_OUTPUTS)
        _check_pixel_budget(self.width, self.height, self.num_outputs)
        _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        _check_float("guidance_scale", self.guidance_scale, 1.0, MAX_GUIDANCE)
        try:
            check_scheduler_name(self.scheduler)
        except ValueError as err:
            raise InputError(str(err)) from None
        seed = secrets.randbits(63) if self.seed is None else _check_int("seed", self.seed, 0, MAX_SEED)
        _check_float("prompt_strength", self.prompt_strength, 0.0, 1.0)
        if not isinstance(self.output_format, str) or self.output_format not in OUTPUT_FORMATS:
            allowed = ", ".join(OUTPUT_FORMATS)
            raise InputError(f"`output_format` must be one of {allowed}; got {shown(self.output_format)}.")
        _check_int("output_quality", self.output_quality, 1, 100)
        if not isinstance(self.disable_safety_checker, bool):
            got = shown(self.disable_safety_checker)
            raise InputError(f"`disable_safety_checker` must be true or false, got {got}.")
        if not isinstance(self.prompt_weighting, bool):
            raise InputError(f"`prompt_weighting` must be true or false, got {shown(self.prompt_weighting)}.")
        if self.lora_weights is not None and not isinstance(self.lora_weights, str):
            got = shown(self.lora_weights)
            raise InputError(f"`lora_weights` must be a URL, a data URI or a file path, got {got}.")
        _check_float("lora_scale", self.lora_scale, 0.0, lora_weights.MAX_LORA_SCALE)
        _check_int("num_candidates", self.num_candidates, 1, best_of_n.MAX_CANDIDATES)
        image, mask = self._decode_images()
        return ValidatedRequest(request=self, seed=seed, image=image, mask=mask)

    def _decode_images(self) -> tuple[Image.Image | None, Image.Image | None]:
        if self.mask is not None and self.image is None:
            raise InputError("`mask` was given without `image`: inpainting needs the image to repaint.")
        if self.image is None:
            return None, None
        steps_run = int(self.num_inference_steps * self.prompt_strength)
        if steps_run < 1:
            raise InputError(
                f"`prompt_strength` {self.prompt_strength} × `num_inference_steps` {self.num_inference_steps} "
                "leaves no denoising step for `image`: raise either so that their product is at least 1."
            )
        size = (self.width, self.height)
        image = load_image("image", self.image, "RGB").resize(size, Image.Resampling.LANCZOS)
        mask = None if self.mask is None else load_image("mask", self.mask, "L").resize(size, Image.Resampling.NEAREST)
        return image, mask


@dataclass
class ValidatedRequest:
    """A checked request: the seed is fixed and ``image``/``mask`` are decoded and resized to width × height."""

    request: GenerationRequest
    seed: int
    image: Image.Image | None
    mask: Image.Image | None

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint"]:
        if self.image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def seeds(self) -> list[int]:
        """One seed per image: ``seed + i``."""
        return [self.seed + i for i in range(self.request.num_outputs)]


@dataclass
class GeneratedImage:
    """One returned image and the settings that make it again alone (``num_outputs=1``, this ``seed``)."""

    image: Image.Image
    seed: int
    index: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class GenerationResult:
    """The images that passed the safety checker, and the seeds of those that did not."""

    images: list[GeneratedImage]
    flagged_seeds: list[int]
    seeds: list[int]
    output_format: str
    output_quality: int
    inference_seconds: float
    token_report: TokenReport | None = None  # how the prompt was tokenized: pieces, chunks, truncation
    candidates: list[best_of_n.Candidate] = field(default_factory=list)  # best-of-N only: every candidate

    def save(self, folder: str | os.PathLike, *, stem: str = "out") -> list[Path]:
        """Write every image to ``folder`` as ``{stem}-{index}.{format}`` with its settings embedded."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in self.images:
            path = folder / f"{stem}-{item.index}.{self.output_format}"
            save_image(item.image, path, metadata=item.metadata, quality=self.output_quality)
            paths.append(path)
        return paths


def load_pipeline(folder: str | os.PathLike, *, device: str | torch.device | None = None):
    """Load a served checkpoint folder once: CUDA in fp16 when available, else CPU in fp32. No network.

    Args:
        folder: the served layout (safetensors only), e.g. ``weights/``.
        device: overrides the automatic choice; fp16 is used on CUDA only (a T4 has no bf16).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return pipe.to(device)


def load_optional_scorer(
    folder: str | os.PathLike, *, device: str | torch.device | None = None
) -> JapaneseCLIPScorer | None:
    """The Japanese CLIP scorer in ``folder/japanese_clip/``, verified against its manifest; ``None`` when absent.

    Raises :class:`jsd.japanese_clip.ScorerError` naming the file when the folder is there but damaged.
    """
    from jsd.japanese_clip import JapaneseCLIPScorer

    path = scorer_folder(folder)
    if not path.exists():
        return None
    return JapaneseCLIPScorer.from_pretrained(path, device=device)


class ImageGenerator:
    """Generates images for :class:`GenerationRequest`\\ s with one loaded text-to-image pipeline.

    img2img and inpainting reuse the same loaded models (``Cls(**pipe.components)``): nothing is
    loaded twice. The pipeline for each call is assembled fresh around a fresh scheduler, so nothing
    set during one request (scheduler state, a disabled safety checker) is seen by the next.
    """

    def __init__(
        self,
        pipeline: JapaneseStableDiffusionPipeline,
        *,
        model_revision: str = "unknown",
        lora_cache: lora_weights.LoraCache | None = None,
        scorer: JapaneseCLIPScorer | None = None,
    ) -> None:
        """``scorer``: the Japanese CLIP scorer ranking best-of-N candidates (``None``: ``num_candidates`` 1 only)."""
        self.pipeline = pipeline
        self.scorer = scorer
        self.model_revision = model_revision
        self._scheduler_config = dict(pipeline.scheduler.config)
        self.lora_cache = lora_cache or lora_weights.LoraCache()
        self.default_lora: lora_weights.LoraFile | None = None

    def set_default_lora(self, value: str | None, *, name: str = "weights") -> lora_weights.LoraFile | None:
        """Use the LoRA behind ``value`` for requests without ``lora_weights`` (``None``: the base model).

        It is fetched, verified and test-loaded now, so a LoRA that does not fit fails here (raising
        :class:`InputError` naming ``name``), not in every request.
        """
        lora = None
        if value:
            lora = self._resolve_lora(value, name=name)
            with lora_weights.apply_lora(self.pipeline, lora, 1.0, name=name):
                pass
        self.default_lora = lora
        return lora

    def _resolve_lora(self, value: str, *, name: str) -> lora_weights.LoraFile:
        try:
            return self.lora_cache.resolve(value, name=name)
        except lora_weights.LoraError as err:
            raise InputError(str(err)) from None

    @property
    def has_safety_checker(self) -> bool:
        return self.pipeline.safety_checker is not None

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Validate ``request``, generate its images and drop those the safety checker flags.

        Raises:
            InputError: an input is invalid (raised before any model work).
            NSFWError: every image was flagged.
            GenerationError: CUDA ran out of memory (the memory is freed first).
        """
        checked = request.validate()
        if request.num_candidates > 1 and self.scorer is None:
            raise InputError(
                f"`num_candidates` is {request.num_candidates}, but this model has no Japanese CLIP scorer to rank "
                f"candidates with ({SCORER_FOLDER}/ is missing from its weights folder): use `num_candidates` 1, or "
                "add one with `.venv/bin/python scripts/download_weights.py --scorer rinna/japanese-clip-vit-b-16`."
            )
        logger.info("Generating %d image(s) with seeds %s", request.num_outputs, checked.seeds)
        # The pipeline tokenizes the prompt again in encode_prompt; within MAX_PROMPT_CHARS that costs a few
        # milliseconds (about 6 ms for 2,000 characters), so this report is not threaded through to it.
        report = tokenize_prompt(self.pipeline.tokenizer, request.prompt, prompt_weighting=request.prompt_weighting)
        logger.info("Prompt tokens:\n%s", report)
        lora = self.default_lora
        if request.lora_weights:
            lora = self._resolve_lora(request.lora_weights, name="lora_weights")
        pipe = self._assemble(checked)
        start = time.perf_counter()
        try:
            with lora_weights.apply_lora(pipe, lora, request.lora_scale) as cross_attention_kwargs:
                if lora is not None:
                    logger.info("LoRA %s (sha256 %s) at scale %g", lora.source, lora.sha256[:12], request.lora_scale)
                if request.num_candidates == 1:
                    output = self._run(pipe, checked, cross_attention_kwargs)
                else:
                    candidates, images = self._run_candidates(pipe, checked, cross_attention_kwargs)
        except lora_weights.LoraError as err:
            raise InputError(str(err)) from None
        seconds = time.perf_counter() - start
        if request.num_candidates == 1:
            result = self._collect(checked, output, seconds, lora)
        else:
            result = self._collect_best(checked, candidates, images, seconds, lora)
        result.token_report = report
        return result

    def _assemble(self, checked: ValidatedRequest):
        cls = {
            "txt2img": JapaneseStableDiffusionPipeline,
            "img2img": JapaneseStableDiffusionImg2ImgPipeline,
            "inpaint": JapaneseStableDiffusionInpaintPipeline,
        }[checked.mode]
        components = dict(self.pipeline.components)
        components["scheduler"] = make_scheduler(checked.request.scheduler, self._scheduler_config)
        safety = not checked.request.disable_safety_checker and self.has_safety_checker
        if not safety:
            components["safety_checker"] = None
        pipe = cls(**components, requires_safety_checker=safety)
        pipe.set_progress_bar_config(**getattr(self.pipeline, "_progress_bar_config", {}))
        return pipe

    def _run(
        self,
        pipe,
        checked: ValidatedRequest,
        cross_attention_kwargs: dict | None = None,
        seeds: list[int] | None = None,
    ):
        """One pipeline call: an image per seed (default: the request's ``seed + i``)."""
        request = checked.request
        seeds = checked.seeds if seeds is None else seeds
        # CPU generators: the starting noise for a seed is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": len(seeds),
            "generator": generators,
            "prompt_weighting": request.prompt_weighting,
        }
        if cross_attention_kwargs is not None:  # only with a LoRA: the base model's call stays as it was
            kwargs["cross_attention_kwargs"] = cross_attention_kwargs
        if checked.mode == "txt2img":
            kwargs |= {"width": request.width, "height": request.height}
        else:
            kwargs |= {"image": checked.image, "strength": request.prompt_strength}
        if checked.mode == "inpaint":
            kwargs |= {"mask_image": checked.mask, "width": request.width, "height": request.height}
        try:
            return pipe(**kwargs)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or cuDNN/cuBLAS failing to allocate
            if not is_out_of_memory(err):
                raise
        # Out of memory, handled here: once the except block has ended, its traceback no longer holds the tensors.
        free_accelerator_memory()
        raise GenerationError(
            f"CUDA ran out of memory generating {len(seeds)} image(s) of {request.width}×"
            f"{request.height}: lower `num_outputs`, `width` or `height` and try again."
        )

    def _run_candidates(
        self, pipe, checked: ValidatedRequest, cross_attention_kwargs: dict | None
    ) -> tuple[list[best_of_n.Candidate], list[Image.Image]]:
        """Best-of-N: every candidate, in batches within the pixel budget, then scored against the prompt."""
        request = checked.request
        seeds = best_of_n.candidate_seeds(checked.seed, request.num_outputs, request.num_candidates)
        per_batch = best_of_n.candidates_per_batch(request.width, request.height, MAX_PIXELS)
        images, flags = [], []
        for batch in best_of_n.batches(seeds, per_batch):
            output = self._run(pipe, checked, cross_attention_kwargs, seeds=batch)
            images += output.images
            flags += output.nsfw_content_detected or [False] * len(output.images)
        candidates = [
            best_of_n.Candidate(output=k // request.num_candidates, seed=seed, nsfw=bool(nsfw))
            for k, (seed, nsfw) in enumerate(zip(seeds, flags, strict=True))
        ]
        scored = [k for k, candidate in enumerate(candidates) if not candidate.nsfw]
        text = best_of_n.scoring_text(request.prompt, prompt_weighting=request.prompt_weighting)
        scores = self.scorer.score([images[k] for k in scored], [text] * len(scored))
        for k, score in zip(scored, scores.tolist(), strict=True):
            candidates[k].score = score
        return candidates, images

    def _collect_best(
        self,
        checked: ValidatedRequest,
        candidates: list[best_of_n.Candidate],
        images: list[Image.Image],
        seconds: float,
        lora: lora_weights.LoraFile | None = None,
    ) -> GenerationResult:
        request = checked.request
        best = best_of_n.choose(candidates)
        kept = []
        for candidate in candidates:
            state = "chosen" if candidate.chosen else "flagged" if candidate.nsfw else "not chosen"
            logger.info(
                "Image %d candidate seed %d: score %s, %s", candidate.output, candidate.seed, candidate.score, state
            )
        for index in range(request.num_outputs):
            if index not in best:
                logger.warning("Every candidate of image %d was flagged by the safety checker.", index)
                continue
            chosen = best[index]
            metadata = self.metadata(request, chosen.seed, lora)
            metadata |= {"clip_score": f"{chosen.score:.2f}", "num_candidates": str(request.num_candidates)}
            image = images[candidates.index(chosen)]
            kept.append(GeneratedImage(image=image, seed=chosen.seed, index=index, metadata=metadata))
        flagged = [c.seed for c in candidates if c.nsfw]
        if not kept:
            raise NSFWError(
                f"All {len(flagged)} candidate(s) were flagged as NSFW by the safety checker (seeds "
                f"{', '.join(map(str, flagged))}); nothing is returned. Try another prompt or seed."
            )
        return GenerationResult(
            images=kept,
            flagged_seeds=flagged,
            seeds=[c.seed for c in candidates],
            output_format=request.output_format,
            output_quality=request.output_quality,
            inference_seconds=seconds,
            candidates=candidates,
        )

    def _collect(
        self, checked: ValidatedRequest, output, seconds: float, lora: lora_weights.LoraFile | None = None
    ) -> GenerationResult:
        request = checked.request
        flags = output.nsfw_content_detected or [False] * len(output.images)
        kept, flagged = [], []
        for index, (image, seed, nsfw) in enumerate(zip(output.images, checked.seeds, flags, strict=True)):
            if nsfw:
                logger.warning("Image %d (seed %d) was flagged by the safety checker and is not returned.", index, seed)
                flagged.append(seed)
                continue
            metadata = self.metadata(request, seed, lora)
            kept.append(GeneratedImage(image=image, seed=seed, index=index, metadata=metadata))
        if not kept:
            raise NSFWError(
                f"All {len(flagged)} image(s) were flagged as NSFW by the safety checker (seeds "
                f"{', '.join(map(str, flagged))}); nothing is returned. Try another prompt or seed."
            )
        return GenerationResult(
            images=kept,
            flagged_seeds=flagged,
            seeds=checked.seeds,
            output_format=request.output_format,
            output_quality=request.output_quality,
            inference_seconds=seconds,
        )

    def metadata(
        self, request: GenerationRequest, seed: int, lora: lora_weights.LoraFile | None = None
    ) -> dict[str, str]:
        """The settings embedded in an output file: enough to reproduce that one image."""
        settings = asdict(request)
        fields = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "width", "height")
        meta = {name: str(settings[name]) for name in fields}
        meta |= {"seed": str(seed), "model_revision": self.model_revision}
        meta |= {"prompt_weighting": str(request.prompt_weighting)}
        if request.image is not None:
            meta |= {"mode": "inpaint" if request.mask is not None else "img2img"}
            meta |= {"prompt_strength": str(request.prompt_strength)}
        if lora is not None:  # its hash, not its URL (which may carry a signed token)
            meta |= {"lora_sha256": lora.sha256, "lora_scale": str(request.lora_scale)}
        return meta


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA out of memory, as torch raises it or as a cuDNN/cuBLAS allocation failure."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "_ALLOC_FAILED" in text


def free_accelerator_memory() -> None:
    """Release cached CUDA memory after an out-of-memory error, so the next request can run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_image(name: str, value: str | os.PathLike | Image.Image, mode: str) -> Image.Image:
    """Decode an input image fully (``mode`` "RGB" or "L"), or raise :class:`InputError` naming ``name``."""
    if isinstance(value, Image.Image):
        return ImageOps.exif_transpose(value).convert(mode)
    try:
        with Image.open(value) as image:
            image.load()  # decode now: a truncated file fails here, not halfway through generation
            return ImageOps.exif_transpose(image).convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(
            f"`{name}` could not be read as an image (PNG, JPEG or WebP expected): {type(err).__name__}: {err}"
        ) from None


XMP_NAMESPACE = "urn:jsd:generation:1"


def save_image(image: Image.Image, path: str | os.PathLike, *, metadata: dict[str, str], quality: int = 90) -> Path:
    """Save ``image`` with ``metadata`` embedded: PNG text chunks, or an XMP packet for WebP and JPEG.

    The format follows the suffix (``.png``, ``.webp``, ``.jpg``). :func:`read_metadata` reads it back.
    """
    path = Path(path)
    fmt = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so Japanese prompts survive
        image.save(path, "PNG", pnginfo=info)
    else:
        image.convert("RGB").save(path, fmt, quality=quality, xmp=_xmp_packet(metadata))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The settings :func:`save_image` embedded in a PNG, WebP or JPEG file."""
    import xml.etree.ElementTree as ET

    with Image.open(path) as image:
        if image.format == "PNG":
            return {k: str(v) for k, v in image.text.items()}
        xmp = image.info.get("xmp")
    if not xmp:
        return {}
    root = ET.fromstring(xmp)
    prefix = "{" + XMP_NAMESPACE + "}"
    return {el.tag[len(prefix) :]: el.text or "" for el in root.iter() if el.tag.startswith(prefix)}


def _xmp_packet(metadata: dict[str, str]) -> bytes:
    """The XMP packet of ``metadata``: characters XML 1.0 forbids are dropped, a carriage return kept as ``&#13;``."""
    fields = "".join(
        f"<jsd:{key}>{escape(_NOT_XML_CHARS.sub('', value), {chr(13): '&#13;'})}</jsd:{key}>"
        for key, value in metadata.items()
    )
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:jsd="{XMP_NAMESPACE}">{fields}</rdf:Description>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


SHOWN_CHARS = 80  # of a bad value echoed in an error message: the reason must not drown after 2,000 characters


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut after ``limit`` characters: ``'猫猫…' (2,345 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters as text"
    return f"{text[:limit]}… ({size})"


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InputError(f"`{name}` must be text, got {type(value).__name__}: {shown(value)}.")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(
            f"`{name}` has {len(value):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed (the model reads "
            f"at most {DEFAULT_MAX_PROMPT_CHUNKS} chunks of 76 tokens, about 400 Japanese characters): shorten it."
        )
    bad = _FORBIDDEN_TEXT_CHARS.search(value)
    if bad:
        code = ord(bad.group())
        if 0xD800 <= code <= 0xDFFF:
            kind, allowed = "an unpaired surrogate", "text must be valid Unicode"
        else:
            kind, allowed = (
                "the control character",
                "the only control characters allowed are tab, newline and carriage return",
            )
        raise InputError(f"`{name}` contains {kind} U+{code:04X} at position {bad.start()}; {allowed}: remove it.")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"`{name}` must be an integer between {low} and {high}, got {shown(value)}.")
    if not low <= value <= high:
        raise InputError(f"`{name}` must be between {low} and {high}, got {value}.")
    return value


def _check_float(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        raise InputError(f"`{name}` must be a number between {low} and {high}, got {shown(value)}.")
    if not low <= value <= high:
        raise InputError(f"`{name}` must be between {low} and {high}, got {value}.")
    return float(value)


def _check_pixel_budget(width: int, height: int, num_outputs: int) -> None:
    pixels = width * height * num_outputs
    if pixels > MAX_PIXELS:
        raise InputError(
            f"`width` × `height` × `num_outputs` = {width}×{height}×{num_outputs} = {pixels:,} pixels exceeds the "
            f"budget of {MAX_PIXELS:,} pixels per request (four 768×768 images on a 16 GB T4): lower "
            "`num_outputs`, `width` or `height`."
        )
