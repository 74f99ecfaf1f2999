"""Cog entry point (cog.yaml ``run: predict.py:Predictor``): typed inputs → one jsd.serving call → image files.

Run it with Docker (``cog predict -i prompt=...``) or without (``.venv/bin/python scripts/cog_local.py predict ...``).
The logic lives in :mod:`jsd.serving` (LoRAs: :mod:`jsd.lora_weights`); this file only maps Cog's inputs and outputs
onto it. A version trained on Replicate (``train.py``) starts with ``COG_WEIGHTS`` = the trainer's .tar: Cog
passes it to ``setup(weights)`` and it becomes the default LoRA.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cog import BaseRunner, Input, Path

from jsd import best_of_n, scratch, serving
from jsd.lora_weights import MAX_LORA_SCALE
from jsd.manifest import verify_manifest
from jsd.optimize import optimize_pipeline
from jsd.schedulers import DEFAULT_SCHEDULER, scheduler_names

# Never reach the network from a prediction: the weights are local (JSD_WEIGHTS, default weights/).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger("jsd.predict")
SIDES = list(range(serving.MIN_SIDE, serving.MAX_SIDE + 1, serving.SIZE_STEP))


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """Verify the checkpoint against its manifest, then load it once (CUDA fp16, else CPU fp32).

        ``weights``: Cog's ``COG_WEIGHTS`` (the URL of a training's output, for a trained version): the LoRA
        used when a request gives no ``lora_weights``. A LoRA that does not fit fails setup.
        """
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # One folder for the outputs, emptied at the start of every run: predictions run one at a time
        # (cog.yaml sets no concurrency) and Cog has read the previous outputs before it starts the next.
        # It is removed when the server stops (jsd.scratch: atexit, or the next setup after a crash).
        self.output_dir = scratch.process_folder("jsd-outputs-")
        folder = os.environ.get("JSD_WEIGHTS", "weights")
        start = time.perf_counter()
        manifest = verify_manifest(folder)  # a damaged or partial checkpoint fails setup here
        verified = time.perf_counter()
        pipe = serving.load_pipeline(folder)
        optimize_pipeline(pipe, pipe.device)  # SDPA, channels_last, VAE slicing/tiling; logs what it did
        # weights/japanese_clip/, verified against its own manifest (a damaged one fails setup); None if absent.
        scorer = serving.load_optional_scorer(folder, device=pipe.device)
        loaded = time.perf_counter()
        revision = str(manifest.get("revision", "unknown"))
        self.generator = serving.ImageGenerator(pipe, model_revision=revision, scorer=scorer)
        logger.info(
            "Loaded %s (revision %s) on %s/%s: verify %.1f s, load %.1f s",
            folder,
            self.generator.model_revision,
            pipe.device,
            pipe.dtype,
            verified - start,
            loaded - verified,
        )
        if weights:
            default = self.generator.set_default_lora(weights)
            logger.info("Default LoRA (COG_WEIGHTS) %s, sha256 %s", default.source, default.sha256)
        if scorer is None:
            logger.info("No Japanese CLIP scorer in %s: `num_candidates` above 1 is refused.", folder)
        else:
            logger.info("Japanese CLIP scorer (%s) loaded: best-of-N is available.", scorer.model_type)
        if not self.generator.has_safety_checker:
            logger.warning("This checkpoint has no safety checker: images are returned unchecked.")

    def run(
        self,
        prompt: str = Input(
            description=f"What to draw, in Japanese (at most {serving.MAX_PROMPT_CHARS:,} characters; no control "
            "characters other than tab, newline and carriage return).",
            max_length=serving.MAX_PROMPT_CHARS,
            default=serving.DEFAULT_PROMPT,
        ),
        negative_prompt: str = Input(
            description=f"What not to draw (at most {serving.MAX_PROMPT_CHARS:,} characters).",
            max_length=serving.MAX_PROMPT_CHARS,
            default="",
        ),
        prompt_weighting: bool = Input(
            description="Read (text:1.3) or （テキスト：１．３） as emphasis weights in `prompt` and "
            "`negative_prompt`; off: brackets are plain text. Write a literal bracket as \\( or \\).",
            default=True,
        ),
        width: int = Input(description="Output width in pixels.", choices=SIDES, default=512),
        height: int = Input(description="Output height in pixels.", choices=SIDES, default=512),
        num_outputs: int = Input(
            description=f"Number of images. width × height × num_outputs must stay within {serving.MAX_PIXELS:,} "
            "pixels (four 768×768 images).",
            ge=1,
            le=serving.MAX_OUTPUTS,
            default=1,
        ),
        num_inference_steps: int = Input(description="Denoising steps.", ge=1, le=serving.MAX_STEPS, default=25),
        guidance_scale: float = Input(
            description="How closely to follow the prompt (classifier-free guidance).",
            ge=1,
            le=serving.MAX_GUIDANCE,
            default=7.5,
        ),
        scheduler: str = Input(description="Sampler.", choices=scheduler_names(), default=DEFAULT_SCHEDULER),
        seed: int | None = Input(
            description="Seed of the first image; image i uses seed + i (alone, with seed + i, it comes out the same "
            "up to rounding: at most 1 level per pixel on CPU, more after lossy WebP/JPEG encoding). Leave empty for a "
            "random seed.",
            ge=0,
            le=serving.MAX_SEED,
            default=None,
        ),
        image: Path | None = Input(  # noqa: B008 (Cog reads inputs from the defaults)
            description="Starting image for img2img (resized to width × height).", default=None
        ),
        mask: Path | None = Input(  # noqa: B008
            description="Inpainting mask for `image`: white is repainted, black is kept.", default=None
        ),
        prompt_strength: float = Input(
            description="How much of `image` (or of the masked area) to replace; 1.0 replaces it all.",
            ge=0,
            le=1,
            default=0.8,
        ),
        output_format: str = Input(
            description="Image file format.", choices=list(serving.OUTPUT_FORMATS), default="webp"
        ),
        output_quality: int = Input(
            description="Quality of webp/jpg files (png is lossless).", ge=1, le=100, default=90
        ),
        disable_safety_checker: bool = Input(
            description="Return images the safety checker would flag as NSFW.", default=False
        ),
        lora_weights: str | None = Input(
            description="A LoRA for this request: an http(s) URL, data URI or path of a trainer .tar (this "
            "model's trainings) or a .safetensors in diffusers or kohya format, made for Japanese Stable "
            "Diffusion. Empty: the trained version's own LoRA, if any, else the base model.",
            default=None,
        ),
        lora_scale: float = Input(
            description="Strength of the LoRA; 0 gives the base model's image.",
            ge=0,
            le=MAX_LORA_SCALE,
            default=1.0,
        ),
        num_candidates: int = Input(
            description="Best-of-N: generate this many candidates per image and return the one rinna's Japanese "
            "CLIP scores highest against the prompt (needs the scorer in the weights, else only 1 is accepted). "
            "N candidates take about N times the generation time, plus a little for scoring, but no more memory: "
            "they are generated in batches within the pixel budget. Candidate j of image i uses seed + i·N + j. "
            "1: plain generation.",
            ge=1,
            le=best_of_n.MAX_CANDIDATES,
            default=1,
        ),
    ) -> list[Path]:
        shutil.rmtree(self.output_dir, ignore_errors=True)  # the previous prediction's files
        os.makedirs(self.output_dir)
        request = serving.GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            image=image,
            mask=mask,
            prompt_strength=prompt_strength,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            prompt_weighting=prompt_weighting,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            num_candidates=num_candidates,
        )
        result = self.generator.generate(request)
        for name, value in result.token_report.metrics().items():  # prompt_tokens, prompt_chunks, ...
            self.record_metric(name, value)
        self.record_metric("seeds", result.seeds)
        if result.candidates:  # best-of-N: every candidate's seed and score, and which were returned
            self.record_metric("candidates", [c.metric() for c in result.candidates])
        self.record_metric("nsfw_filtered", len(result.flagged_seeds))
        self.record_metric("inference_seconds", round(result.inference_seconds, 3))
        logger.info("Seeds %s; returned %d image(s)", result.seeds, len(result.images))
        return [Path(p) for p in result.save(self.output_dir)]
