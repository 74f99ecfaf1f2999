"""Fine-tuning configuration: one dataclass, diffusers' flag names, per-stage override files.

Precedence: the defaults below < a JSON file given with ``--config`` (e.g. ``configs/train/stage1.json``,
which holds only its overrides) < flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# The one place where the two stages of the recipe differ: which components are trained.
# Every other component is frozen (requires_grad False, eval mode). The VAE never trains.
TRAINED_MODULES: dict[int, tuple[str, ...]] = {
    1: ("text_encoder",),  # stage 1: a Japanese text encoder under the frozen latent diffusion model
    2: ("text_encoder", "unet"),  # stage 2: text encoder and UNet jointly, so that images become Japanese
}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def opt(default: Any, help: str, **argparse_kwargs) -> Any:
    """A config field with its help text (shown by ``--help``) and extra argparse settings."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; the flag of a field is ``--<field name>``."""

    # --- what to train
    stage: int = opt(2, "1: train the text encoder only; 2: text encoder and UNet jointly.", choices=(1, 2))
    pretrained_model_name_or_path: str | None = opt(
        None, "Checkpoint to start from: a folder in the served/diffusers layout or a hub repo id (required)."
    )
    revision: str | None = opt(None, "Hub revision of --pretrained_model_name_or_path.")
    tokenizer_name: str | None = opt(
        None, "A tokenizer folder (e.g. from scripts/train_tokenizer.py) instead of the checkpoint's tokenizer/."
    )
    text_encoder_init: str = opt(
        "pretrained",
        "'pretrained': start from the checkpoint's text encoder; 'scratch': re-initialise it (the paper's stage 1).",
        choices=("pretrained", "scratch"),
    )
    # --- LoRA: adapters on the frozen model instead of whole modules (jsd.training.adapters)
    lora_rank: int | None = opt(
        None,
        "Train LoRA adapters of this rank (diffusers' --rank) on the UNet's attention instead of fine-tuning whole "
        "modules (--stage is then ignored); the output is lora.safetensors + lora_kohya.safetensors.",
        type=int,
    )
    train_text_encoder: bool = opt(False, "With --lora_rank: LoRA on the text encoder's attention too.")
    # --- data
    train_data_dir: str | None = opt(None, "Image folder with metadata.jsonl (file_name, text per line).")
    train_shards: list[str] = field(
        default_factory=list,
        metadata={
            "help": "WebDataset tar shards, brace patterns allowed ('data/shard-{000000..000099}.tar'), or 'pipe:CMD'.",
            "nargs": "+",
        },
    )
    caption_column: str = opt("text", "Key of the caption in metadata.jsonl / in a shard's .json.")
    resolution: int = opt(512, "Images are resized (shorter side) and center-cropped to this square size.")
    random_flip: bool = opt(False, "Flip images horizontally at random (deterministic per seed, epoch and image).")
    caption_dropout: float = opt(0.1, "Probability of replacing a caption by '' (trains the unconditional branch).")
    dataloader_num_workers: int = opt(0, "Processes that read and decode images (0: the training process).")
    cache_latents: bool = opt(
        False,
        "Encode each picture (and each flip of it) with the VAE once, the first time it is drawn, and keep its "
        "latent distribution in memory: faster steps for a dataset that fits (diffusers' --cache_latents).",
    )
    # --- Japanese CLIP (jsd.clip_filter, jsd.training.clip_score): the data filter and validation scores
    min_clip_score: float | None = opt(
        None,
        "Drop the pairs of --train_data_dir whose Japanese CLIP score is below this (0-100) before training, as "
        "rinna cleaned their data; the kept and dropped lists go to PROJECT_DIR/clip_filter/.",
        type=float,
    )
    scorer_path: str | None = opt(
        None,
        "Japanese CLIP folder for --min_clip_score and validation scores. Default: the checkpoint's japanese_clip/.",
    )
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompts generated every --validation_steps steps and at the end (prompt i at seed --seed + i); "
            "images and Japanese CLIP scores go to the tracker and PROJECT_DIR/validation/.",
            "nargs": "+",
        },
    )
    validation_steps: int = opt(100, "Run the --validation_prompts every N steps (and at the last step).")
    # --- optimisation
    train_batch_size: int = opt(16, "Images per process per forward pass.")
    gradient_accumulation_steps: int = opt(1, "Forward passes per optimizer step.")
    num_train_epochs: int = opt(100, "Passes over --train_data_dir when --max_train_steps is not given.")
    max_train_steps: int | None = opt(None, "Optimizer steps in total (required with --train_shards).", type=int)
    learning_rate: float = opt(1e-4, "Learning rate after warm-up.")
    scale_lr: bool = opt(False, "Multiply the learning rate by batch size, accumulation and number of processes.")
    lr_scheduler: str = opt("constant", "diffusers' get_scheduler name.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(500, "Warm-up steps of the learning rate scheduler.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Gradients are clipped to this norm.")
    snr_gamma: float | None = opt(
        None,
        "Min-SNR loss weighting (Hang et al. 2023) with this gamma, as diffusers' train_text_to_image.py: "
        "5.0 is the paper's value. Default: plain MSE.",
        type=float,
    )
    prediction_type: str | None = opt(
        None, "Override the scheduler config's prediction type.", choices=("epsilon", "v_prediction")
    )
    use_ema: bool = opt(False, "Keep an exponential moving average of the trained weights and save it.")
    ema_decay: float = opt(0.9999, "Decay of the moving average (--use_ema).")
    # --- hardware
    mixed_precision: str | None = opt(
        None,
        "Autocast precision, frozen components are stored in it (fp16 needs a GPU). Default: accelerate's config.",
        choices=("no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere and newer GPUs.")
    seed: int = opt(0, "Seeds data order, flips, caption dropout, noise and timesteps: a run is reproducible.")
    # --- outputs and robustness
    output_dir: str = opt("jsd-finetuned", "Where the served layout (with manifest.json) is written at the end.")
    project_dir: str | None = opt(
        None, "Checkpoints (checkpoint-N/) and logs; kept out of --output_dir. Default: OUTPUT_DIR-run."
    )
    logging_dir: str = opt("logs", "Tensorboard folder, relative to --project_dir.")
    report_to: str = opt("tensorboard", "accelerate tracker ('tensorboard', 'wandb', …, or 'none').")
    tracker_project_name: str = opt("jsd-finetune", "Project name given to the tracker.")
    checkpointing_steps: int = opt(500, "Save the full training state (accelerate save_state) every N steps.")
    checkpoints_total_limit: int | None = opt(None, "Keep at most this many checkpoints (oldest deleted).", type=int)
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to resume from.")

    description: ClassVar[str] = (
        "Fine-tune Japanese Stable Diffusion (stage 1: text encoder; stage 2: text encoder + UNet)."
    )
    # Settings beyond the trainer's own RESUME_MUST_MATCH that a resumed run must keep (a subclass adds its own).
    resume_keys: ClassVar[tuple[str, ...]] = ()

    def lora_target_modules_of(self) -> dict[str, tuple[str, ...]]:
        """Which layers of each module get LoRA adapters; empty: :mod:`jsd.training.adapters`' defaults."""
        return {}

    @property
    def trained_modules(self) -> tuple[str, ...]:
        """The modules that train: per stage, or those that carry LoRA adapters (``--lora_rank``)."""
        if self.lora_rank is not None:
            return ("unet", "text_encoder") if self.train_text_encoder else ("unet",)
        return TRAINED_MODULES[self.stage]

    @property
    def run_dir(self) -> Path:
        return Path(self.project_dir) if self.project_dir else Path(f"{self.output_dir.rstrip('/')}-run")

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the setting, the value and what is allowed."""
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                allowed = ", ".join(map(str, choices))
                raise ValueError(f"`--{f.name}`={value!r} is not allowed; choose one of {allowed}.")
        if not self.pretrained_model_name_or_path:
            raise ValueError("`--pretrained_model_name_or_path` is required: the checkpoint to fine-tune.")
        if bool(self.train_data_dir) == bool(self.train_shards):
            raise ValueError(
                f"Give exactly one of `--train_data_dir` ({self.train_data_dir!r}) and `--train_shards` "
                f"({self.train_shards!r})."
            )
        if self.train_shards and self.max_train_steps is None:
            raise ValueError("`--max_train_steps` is required with `--train_shards`: a stream has no epoch length.")
        if self.min_clip_score is not None:
            from jsd.clip_filter import check_threshold

            check_threshold(self.min_clip_score)  # FilterError is a ValueError naming `--min_clip_score`
            if not self.train_data_dir:
                raise ValueError(
                    "`--min_clip_score` filters an image folder (`--train_data_dir`), not `--train_shards`: filter "
                    "the images before packing the shards (python -m jsd filter-data lists the kept pairs)."
                )
        names = ("resolution", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
        for name in (*names, "validation_steps"):
            _require_positive(name, getattr(self, name))
        if self.resolution % 8:
            raise ValueError(f"`--resolution`={self.resolution} must be a multiple of 8 (the VAE downsamples by 8).")
        for name in ("max_train_steps", "checkpoints_total_limit", "lora_rank"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.train_text_encoder and self.lora_rank is None:
            raise ValueError(
                "`--train_text_encoder` needs `--lora_rank` (LoRA); full fine-tuning picks its modules by `--stage`."
            )
        if self.use_ema and self.lora_rank is not None:
            raise ValueError("`--use_ema` is for full fine-tuning; LoRA (`--lora_rank`) keeps no moving average.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"`--caption_dropout`={self.caption_dropout} must be within [0, 1].")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"`--dataloader_num_workers`={self.dataloader_num_workers} must be >= 0.")
        return self

    def max_steps(self, num_records: int | None, num_processes: int) -> int:
        """``max_train_steps``, or the steps of ``num_train_epochs`` passes over ``num_records`` images."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        per_step = self.train_batch_size * self.gradient_accumulation_steps * num_processes
        return max(1, math.ceil(self.num_train_epochs * (num_records or 0) / per_step))

    def to_tracker_config(self) -> dict:
        """Scalars only (tensorboard's hparams reject lists and None)."""
        scalars = (int, float, str, bool)
        return {k: (v if isinstance(v, scalars) else str(v)) for k, v in dataclasses.asdict(self).items()}


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"`--{name}`={value} must be a positive integer.")


def build_parser(cls: type[TrainConfig] = TrainConfig, prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of ``cls``; unset flags stay absent so the config file can fill them."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=cls.description,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON file of overrides, e.g. configs/train/stage1.json.")
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"help": f"{meta.pop('help')} (default: {default!r})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.pop("type", type(default) if default not in (None, []) else str)
            kwargs.update(meta)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def load_overrides(path: str | Path, cls: type[TrainConfig] = TrainConfig) -> dict:
    """The settings of a JSON config file; unknown keys are an error (a typo would silently do nothing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--config` file {path} does not exist.")
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"`--config` {path} has unknown settings {unknown}; allowed: {sorted(known)}.")
    return data


def parse_config(
    argv: list[str] | None = None, cls: type[TrainConfig] = TrainConfig, prog: str | None = None
) -> TrainConfig:
    """Defaults < ``--config`` file < command-line flags, validated (``cls``: :class:`DistillConfig` to distil)."""
    args = vars(build_parser(cls, prog).parse_args(argv))
    overrides = load_overrides(args.pop("config"), cls) if "config" in args else {}
    return cls(**(overrides | args)).validate()


# The LoRA layers of diffusers' train_lcm_distill_lora_sd_wds.py (its default --lora_target_modules): attention,
# feed-forward, ResNet convolutions, resamplers and time embeddings: far more than a style LoRA's attention.
LCM_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
DISTILL_LOSS_TYPES = ("l2", "huber")


@dataclass
class DistillConfig(TrainConfig):
    """Distil a 4-step LCM-LoRA from a JSD checkpoint (latent consistency distillation, jsd distill).

    The recipe and flag names of diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``
    (huggingface/diffusers): the checkpoint with classifier-free guidance is the teacher, a DDIM solver over
    ``num_ddim_timesteps`` skipped steps, the guidance scale sampled per example in [``w_min``, ``w_max``], an
    L2 or pseudo-Huber loss, LoRA on the UNet only. The loss lives in :mod:`jsd.training.distill_step`; the
    trainer (data, accelerate, checkpoints, validation, export) is :mod:`jsd.training.trainer`'s own.
    """

    lora_rank: int | None = opt(64, "Rank of the UNet's LoRA (diffusers' --lora_rank).", type=int)
    lora_target_modules: str = opt(
        ",".join(LCM_LORA_TARGET_MODULES), "Comma-separated UNet layer names that get LoRA (diffusers' default)."
    )
    caption_dropout: float = opt(
        0.0, "Probability of replacing a caption by '' (diffusers' --proportion_empty_prompts)."
    )
    num_ddim_timesteps: int = opt(50, "Steps of the DDIM solver the teacher takes (k = 1000 / this apart).")
    w_min: float = opt(5.0, "Lowest guidance scale w drawn per example (LCM's form: the teacher's CFG is 1 + w).")
    w_max: float = opt(15.0, "Highest guidance scale w drawn per example.")
    loss_type: str = opt(
        "huber", "Consistency loss: 'huber' (pseudo-Huber, LCM-LoRA) or 'l2'.", choices=DISTILL_LOSS_TYPES
    )
    huber_c: float = opt(0.001, "The pseudo-Huber loss's c (--loss_type huber).")
    timestep_scaling_factor: float = opt(10.0, "Scales t in the consistency boundary conditions c_skip, c_out.")
    output_dir: str = opt("jsd-lcm-lora", "Where the LoRA (diffusers + kohya files, training.json) is written.")
    tracker_project_name: str = opt("jsd-distill", "Project name given to the tracker.")

    description: ClassVar[str] = "Distil a 4-step LCM-LoRA for Japanese Stable Diffusion (latent consistency)."
    resume_keys: ClassVar[tuple[str, ...]] = (
        "lora_target_modules", "num_ddim_timesteps", "w_min", "w_max", "loss_type", "huber_c",
        "timestep_scaling_factor", "prediction_type",
    )  # fmt: skip

    def lora_target_modules_of(self) -> dict[str, tuple[str, ...]]:
        return {"unet": tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())}

    def validate(self) -> DistillConfig:
        if self.lora_rank is None:
            raise ValueError("`--lora_rank` is required: distillation trains a LoRA on the UNet.")
        if self.train_text_encoder:
            raise ValueError("`--train_text_encoder` is not part of LCM-LoRA distillation: the LoRA is UNet-only.")
        super().validate()
        if not self.lora_target_modules_of()["unet"]:
            raise ValueError(f"`--lora_target_modules`={self.lora_target_modules!r} names no layer.")
        _require_positive("num_ddim_timesteps", self.num_ddim_timesteps)
        if self.num_ddim_timesteps > 1000:
            raise ValueError(f"`--num_ddim_timesteps`={self.num_ddim_timesteps} must be at most 1000.")
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(f"`--w_min`={self.w_min} and `--w_max`={self.w_max} need 0 <= w_min <= w_max.")
        if self.huber_c <= 0:
            raise ValueError(f"`--huber_c`={self.huber_c} must be positive.")
        if self.timestep_scaling_factor <= 0:
            raise ValueError(f"`--timestep_scaling_factor`={self.timestep_scaling_factor} must be positive.")
        return self
