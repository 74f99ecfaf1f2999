"""The Japanese CLIP in a fine-tuning run: the data filter before it, validation images and scores during it.

* :func:`load_run_scorer` — the scorer of ``--scorer_path``, or of the checkpoint's ``japanese_clip/``;
* :func:`filter_training_data` — ``--min_clip_score``: the pairs of ``--train_data_dir`` scored (sharded over
  the processes, cached in ``PROJECT_DIR/clip_filter/cache``), the dropped ones listed in
  ``PROJECT_DIR/clip_filter/`` and left out of the data the trainer reads;
* :class:`Validator` — ``--validation_prompts`` every ``--validation_steps`` steps and at the end: one image
  per prompt at seed ``seed + i`` (as ``jsd evaluate``), to the tracker with their scores, and into
  ``PROJECT_DIR/validation/step-N/`` (the last one also goes into a LoRA's ``training.json`` and ``.tar``).
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jsd import clip_filter
from jsd.schedulers import DEFAULT_SCHEDULER, make_scheduler
from jsd.training.config import DistillConfig, TrainConfig
from jsd.training.data import ImageFolderSource

logger = logging.getLogger(__name__)

FILTER_FOLDER, VALIDATION_FOLDER, VALIDATION_FILE = "clip_filter", "validation", "validation.json"
VALIDATION_INFERENCE_STEPS = 25  # rinna's README used 50 LMS steps; 25 DPM-Solver++ steps look alike
# A distilled LCM-LoRA is validated as diffusers' LCM-LoRA script does: LCMScheduler, 4 steps, guidance 1.
DISTILL_VALIDATION_STEPS = 4
DISTILL_VALIDATION_GUIDANCE = 1.0


@dataclass(frozen=True)
class UserNames:
    """What the user calls the run's Japanese CLIP inputs, for messages and logs (default: scripts/train.py's flags).

    ``scorer``: the scorer's name when it is the checkpoint's ``japanese_clip/`` (default: named after
    ``--pretrained_model_name_or_path``); ``lists``: where the user finds the kept/dropped lists and the histogram
    (default: the run folder's ``clip_filter/``, also named in the error of a threshold that drops every pair).
    """

    threshold: str = "--min_clip_score"
    data: str = "--train_data_dir"
    scorer: str | None = None
    lists: str | None = None


SCRIPT_NAMES = UserNames()  # scripts/train.py's flags


def load_run_scorer(config: TrainConfig, checkpoint: Path, device: torch.device, names: UserNames = SCRIPT_NAMES):
    """The scorer this run needs, or ``None``.

    ``--min_clip_score`` needs one (a missing or damaged one is an error naming it); validation only scores when
    one is there.
    """
    from jsd.japanese_clip import SCORER_FOLDER, scorer_folder

    if config.min_clip_score is None and not config.validation_prompts:
        return None, None
    if config.scorer_path:
        folder, name = Path(config.scorer_path), "--scorer_path"
    else:
        folder = scorer_folder(checkpoint)
        name = names.scorer or f"--pretrained_model_name_or_path {checkpoint}: its {SCORER_FOLDER}/"
    if config.min_clip_score is None and config.scorer_path is None and not folder.is_dir():
        logger.warning("No Japanese CLIP at %s: validation images are logged without scores.", folder)
        return None, None
    return clip_filter.load_scorer(folder, name=name, device=device), folder


def filter_training_data(
    source: ImageFolderSource,
    scorer,
    scorer_folder: Path,
    config: TrainConfig,
    accelerator,
    names: UserNames = SCRIPT_NAMES,
) -> tuple[ImageFolderSource, clip_filter.FilterResult]:
    """``source`` without the pairs scored below ``--min_clip_score``; the lists go to ``PROJECT_DIR/clip_filter``."""
    out = config.run_dir / FILTER_FOLDER
    result = clip_filter.filter_folder(
        source.folder,
        scorer,
        config.min_clip_score,
        cache_dir=out / clip_filter.CACHE_FOLDER,
        scorer_id=clip_filter.scorer_fingerprint(scorer_folder),
        caption_column=config.caption_column,
        name=names.data,
        state=accelerator,
    )
    if accelerator.is_main_process:
        clip_filter.write_outputs(result, out, extra={"data_dir": str(source.folder), "scorer": str(scorer_folder)})
        result.log()
        logger.info("Kept and dropped pairs with their scores, and their histogram: %s", names.lists or out)
    kept = source.only({p.file_name for p in result.kept}, normalize=clip_filter.normal_name)
    if not kept.num_records:
        where = f"; the scores are in {out}" if names.lists is None else ""  # else they leave with the run
        raise clip_filter.FilterError(
            f"`{names.threshold}` {config.min_clip_score:g} drops every pair of `{names.data}`"
            f"{'' if names.lists else f' {source.folder}'} (highest score {max(result.scores, default=0):.2f}): "
            f"lower it{where}."
        )
    return kept, result


@dataclass
class ValidationResult:
    """The images of one validation, their seeds and (with a scorer) their Japanese CLIP scores."""

    step: int
    prompts: list[str]
    seeds: list[int]
    images: list[Image.Image] = field(repr=False)
    clip_scores: list[float] | None

    def to_json(self) -> dict:
        out = {"step": self.step, "prompts": self.prompts, "seeds": self.seeds, "clip_scores": self.clip_scores}
        if self.clip_scores:
            out["clip_score_mean"] = statistics.fmean(self.clip_scores)
        return out

    def save(self, folder: Path) -> Path:
        """``NN.png`` per prompt and ``validation.json`` in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(self.images):
            image.save(folder / f"{i:02d}.png")
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"
        (folder / VALIDATION_FILE).write_text(text, encoding="utf-8")
        return folder


class Validator:
    """Generates and scores the validation images on the main process (the others wait at their next step)."""

    def __init__(self, accelerator, config: TrainConfig, components: dict, scheduler_config: dict, scorer, emas):
        self.accelerator, self.config, self.components = accelerator, config, components
        self.scheduler_config, self.scorer, self.emas = dict(scheduler_config), scorer, emas
        self.last: ValidationResult | None = None

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.config.validation_prompts) and (step % self.config.validation_steps == 0 or step == max_steps)

    def run(self, step: int) -> ValidationResult | None:
        """Images, scores, tracker entries and ``PROJECT_DIR/validation/step-N`` (main process only)."""
        if not self.accelerator.is_main_process:
            return None
        for ema_name, ema in self.emas.items():  # as diffusers' examples: validate the averaged weights
            ema.store(self.components[ema_name].parameters())
            ema.copy_to(self.components[ema_name].parameters())
        try:
            result = self._generate(step)
        finally:
            for ema_name, ema in self.emas.items():
                ema.restore(self.components[ema_name].parameters())
        if self.scorer is not None:
            result.clip_scores = self.scorer.score(result.images, result.prompts).tolist()
        self._log(result)
        result.save(self.config.run_dir / VALIDATION_FOLDER / f"step-{step}")
        self.last = result
        return result

    def _generate(self, step: int) -> ValidationResult:
        from jsd.pipelines import JapaneseStableDiffusionPipeline

        unwrap = self.accelerator.unwrap_model
        modules = {name: unwrap(self.components[name]) for name in ("unet", "text_encoder", "vae")}
        training = {name: m.training for name, m in modules.items()}
        pipe = JapaneseStableDiffusionPipeline(
            **modules,
            tokenizer=self.components["tokenizer"],
            scheduler=self._scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        prompts = list(self.config.validation_prompts)
        seeds = [self.config.seed + i for i in range(len(prompts))]
        side = self.config.resolution
        steps, guidance_scale = VALIDATION_INFERENCE_STEPS, 7.5  # 7.5: the pipeline's default
        if isinstance(self.config, DistillConfig):
            steps, guidance_scale = DISTILL_VALIDATION_STEPS, DISTILL_VALIDATION_GUIDANCE
        images = []
        try:
            for m in modules.values():
                m.eval()
            with torch.no_grad(), self.accelerator.autocast():
                for prompt, seed in zip(prompts, seeds, strict=True):
                    generator = torch.Generator("cpu").manual_seed(seed)  # the same noise on every device
                    images += pipe(
                        prompt,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=generator,
                        height=side,
                        width=side,
                    ).images
        finally:
            for name, m in modules.items():
                m.train(training[name])
        return ValidationResult(step, prompts, seeds, images, None)

    def _scheduler(self):
        if isinstance(self.config, DistillConfig):
            return lcm_scheduler(self.scheduler_config, self.config.num_ddim_timesteps)
        return make_scheduler(DEFAULT_SCHEDULER, self.scheduler_config)

    def _log(self, result: ValidationResult) -> None:
        scores = result.clip_scores
        summary = f"mean Japanese CLIP score {statistics.fmean(scores):.2f}" if scores else "no scorer"
        logger.info("Validation at step %d: %d image(s), %s", result.step, len(result.images), summary)
        # accelerate's tensorboard tracker exposes its SummaryWriter (diffusers' examples log images the same way)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.stack([np.asarray(image) for image in result.images])
                tracker.writer.add_images("validation", array, result.step, dataformats="NHWC")
                rows = [
                    f"| {i} | {s} | {p} |" for i, (p, s) in enumerate(zip(result.prompts, result.seeds, strict=True))
                ]
                table = "| # | seed | prompt |\n|---|---|---|\n" + "\n".join(rows)
                tracker.writer.add_text("validation/prompts", table, result.step)
        if scores:
            values = {"validation/clip_score_mean": statistics.fmean(scores)}
            values |= {f"validation/clip_score_{i:02d}": s for i, s in enumerate(scores)}
            self.accelerator.log(values, step=result.step)


def lcm_scheduler(scheduler_config: dict, num_ddim_timesteps: int):
    """diffusers' ``LCMScheduler`` with its timesteps on the distillation's DDIM grid (``original_inference_steps``)."""
    import inspect

    from diffusers import LCMScheduler

    known = inspect.signature(LCMScheduler.__init__).parameters  # PNDM's skip_prk_steps would only be warned about
    config = {key: value for key, value in scheduler_config.items() if key in known}
    return LCMScheduler.from_config(config, original_inference_steps=num_ddim_timesteps)
