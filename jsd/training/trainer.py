"""The fine-tuning loop: accelerate for devices and processes, diffusers for the model parts.

``train(config)`` runs either stage of the recipe (which modules train is decided in
:data:`jsd.training.config.TRAINED_MODULES`), checkpoints every ``checkpointing_steps``, resumes
exactly, and ends with the served layout (safetensors + manifest) in ``output_dir``. With
``--lora_rank`` it trains peft LoRA adapters instead (:mod:`jsd.training.adapters`) and ends with
``lora.safetensors``, ``lora_kohya.safetensors`` and ``training.json`` in ``output_dir``. With a
:class:`~jsd.training.config.DistillConfig` (``jsd distill``) the loss is latent consistency distillation
(:mod:`jsd.training.distill_step`) and the LoRA is written as ``pytorch_lora_weights.safetensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object
from diffusers import ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from jsd.convert import SERVED_DTYPE, ConversionError, _check_finite
from jsd.loading import load_components, load_scheduler, resolve_checkpoint
from jsd.manifest import swap_into_place, write_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.training import adapters, checkpointing, clip_score, distill_step
from jsd.training.config import DistillConfig, TrainConfig
from jsd.training.data import BadRecords, Position, RecordStream, make_dataloader, make_source
from jsd.training.models import freeze_for_stage, load_training_components
from jsd.training.step import LatentCache, diffusion_loss, drop_captions, tokenize

logger = get_logger(__name__)
# Settings that decide what the data stream, the loss and the trained model are: a resumed run must
# keep them. (The data paths may change, e.g. on another machine; the data behind them must not.)
RESUME_MUST_MATCH = (
    "stage",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "dataloader_num_workers",
    "resolution",
    "tokenizer_name",
    "text_encoder_init",
    "mixed_precision",
    "lora_rank",
    "train_text_encoder",
    "min_clip_score",
)
# diffusers' own LoRA file name (LORA_WEIGHT_NAME_SAFE): `load_lora_weights(folder)` finds it without a weight_name,
# as it does in latent-consistency/lcm-lora-sdv1-5.
DISTILLED_LORA_NAME = "pytorch_lora_weights.safetensors"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunState:
    """What one process must remember, beyond accelerate's state, to resume exactly."""

    generator: torch.Generator
    step: int = 0
    positions: dict[int, Position] = field(default_factory=dict)
    bad: BadRecords = field(default_factory=BadRecords)

    def consume(self, batch: dict) -> None:
        self.positions[batch["stream"]] = batch["position"]
        for key, reason in batch["bad"]:
            self.bad.add(key, reason)

    def state_dict(self, num_processes: int, settings: dict[str, str]) -> dict:
        return {
            "num_processes": num_processes,
            "config": settings,
            "generator": self.generator.get_state(),
            "positions": {k: [p.epoch, p.shard, p.record] for k, p in self.positions.items()},
            "bad": self.bad.state_dict(),
        }

    def load_state_dict(self, state: dict, step: int) -> None:
        self.step = step
        self.generator.set_state(state["generator"])
        self.positions = {int(k): Position(*v) for k, v in state["positions"].items()}
        self.bad.load_state_dict(state["bad"])


def run_settings(config: TrainConfig, accelerator: Accelerator) -> dict[str, str]:
    """The :data:`RESUME_MUST_MATCH` settings, as saved in checkpoints; mixed precision as accelerate resolved it."""
    settings = {key: str(getattr(config, key)) for key in (*RESUME_MUST_MATCH, *config.resume_keys)}
    settings["mixed_precision"] = accelerator.mixed_precision  # the flag may be left to accelerate's config
    return settings


def train(config: TrainConfig, *, names: clip_score.UserNames = clip_score.SCRIPT_NAMES) -> Path:
    """Run one stage of fine-tuning; returns ``output_dir`` (the served layout, on the main process).

    ``names``: what the user calls the Japanese CLIP inputs (another front end than scripts/train.py's flags).
    """
    accelerator = make_accelerator(config)
    log_setup(accelerator, config)
    refuse_unsupported_sharding(accelerator.distributed_type, config)
    refuse_to_mix_runs(config)
    source = make_source(  # before loading models: a wrong data path fails at once
        train_data_dir=config.train_data_dir, train_shards=config.train_shards, caption_column=config.caption_column
    )
    with accelerator.main_process_first():
        source_folder = resolve_checkpoint(config.pretrained_model_name_or_path, revision=config.revision)
    scorer, scorer_folder = clip_score.load_run_scorer(config, source_folder, accelerator.device, names)
    data_filter = None
    if config.min_clip_score is not None:  # rinna's recipe: low-scoring pairs never reach the trainer
        source, data_filter = clip_score.filter_training_data(source, scorer, scorer_folder, config, accelerator, names)
    if accelerator.is_local_main_process:  # after the checks above: a run they stop leaves no empty folder
        config.run_dir.mkdir(parents=True, exist_ok=True)
    components = load_training_components(source_folder, config)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    if config.lora_rank is None:
        trained = freeze_for_stage(
            components, config.trained_modules, device=accelerator.device, weight_dtype=weight_dtype
        )
    else:  # everything frozen in the weight dtype; only the adapters train
        freeze_for_stage(components, (), device=accelerator.device, weight_dtype=weight_dtype)
        trained = adapters.add_lora_adapters(
            components,
            config.trained_modules,
            rank=config.lora_rank,
            seed=config.seed,
            target_modules=config.lora_target_modules_of(),
        )
        adapters.register_lora_checkpointing(accelerator, trained)
    if config.gradient_checkpointing:
        components["unet"].enable_gradient_checkpointing()
        components["text_encoder"].activation_checkpointing_enable()  # transformers 5's name

    max_steps = config.max_steps(source.num_records, accelerator.num_processes)
    optimizer = make_optimizer(trained, config, accelerator.num_processes)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps a prepared scheduler once per process per optimizer step
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)], strict=True))
    optimizer, lr_scheduler = prepared[len(trained) :]
    components |= trained
    emas = make_emas(accelerator, trained, config)
    components["latent_cache"] = LatentCache(components["vae"]) if config.cache_latents else None
    if isinstance(config, DistillConfig):  # the DDIM solver's grid, and the UNet whose LoRA the teacher switches off
        components["solver"] = distill_step.make_solver(components["noise_scheduler"], config.num_ddim_timesteps).to(
            accelerator.device
        )
        components["lora_unet"] = accelerator.unwrap_model(trained["unet"])

    # one generator per process for caption dropout, VAE sampling, noise and timesteps; saved in checkpoints
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + accelerator.process_index)
    state = RunState(generator=generator)
    stream = RecordStream(
        source,
        resolution=config.resolution,
        random_flip=config.random_flip,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=config.dataloader_num_workers,
    )
    resume(accelerator, config, state, stream)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=config.to_tracker_config())
    logger.info(
        "Training %s for %d steps (from step %d); %d images per step",
        " + ".join(trained),
        max_steps,
        state.step,
        config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
    )
    loader = make_dataloader(stream, batch_size=config.train_batch_size, num_workers=config.dataloader_num_workers)
    validator = clip_score.Validator(
        accelerator, config, components, load_scheduler(source_folder / "scheduler").config, scorer, emas
    )
    run_steps(
        accelerator, config, components, trained, emas, optimizer, lr_scheduler, loader, state, max_steps, validator
    )

    bad = report_bad_records(accelerator, state, "at the end")
    for name, ema in emas.items():
        ema.copy_to(accelerator.unwrap_model(trained[name]).parameters())
    final = full_modules(accelerator, trained)
    if accelerator.is_main_process and config.lora_rank is not None:
        info = {"settings": dataclasses.asdict(config), "steps": state.step, "skipped": bad.state_dict()}
        if data_filter is not None:  # every dropped pair listed, with its score
            info["clip_filter"] = data_filter.to_json()
        if validator.last is not None:
            info["validation"] = validator.last.to_json()
        weight_name = DISTILLED_LORA_NAME if isinstance(config, DistillConfig) else None
        adapters.export_lora(Path(config.output_dir), final, info, weight_name=weight_name)
        if validator.last is not None:  # the last validation images beside training.json (the Cog .tar takes them)
            validator.last.save(Path(config.output_dir) / clip_score.VALIDATION_FOLDER)
        logger.info("Saved the LoRA to %s", config.output_dir)
    elif accelerator.is_main_process:
        export_served(
            source_folder,
            Path(config.output_dir),
            final,
            components["tokenizer"],
            source=f"jsd fine-tune stage {config.stage} of {config.pretrained_model_name_or_path}",
            revision=f"stage{config.stage}-step{state.step}",
            prediction_type=config.prediction_type,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return Path(config.output_dir)


def make_accelerator(config: TrainConfig) -> Accelerator:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("`--mixed_precision`='fp16' needs a CUDA GPU; on CPU use 'bf16' or 'no'.")
    run_dir = config.run_dir
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / config.logging_dir)),
        # without a GPU, run on CPU in every process (torchrun / accelerate launch --multi_gpu start them)
        cpu=not torch.cuda.is_available(),
    )


def log_setup(accelerator: Accelerator, config: TrainConfig) -> None:
    state = accelerator.state
    logger.info(
        "Distributed setup: %s with %d processes, device %s, mixed precision %s; stage %d trains %s",
        state.distributed_type.value,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        config.stage,
        " + ".join(config.trained_modules),
    )
    logger.info(
        "Process %d of %d on %s",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        main_process_only=False,
    )
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        logger.warning(
            "%s has not been run with this trainer (only DDP is tested): check the exported %s before serving it.",
            state.distributed_type.value,
            config.output_dir,
        )
    if not accelerator.is_local_main_process:  # one copy of the libraries' warnings, not one per process
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def refuse_unsupported_sharding(distributed_type: DistributedType, config: TrainConfig) -> None:
    """LoRA runs export adapters from the unwrapped modules; under FSDP/DeepSpeed those are shards (and
    ``full_modules`` rebuilds modules without adapters), so such a run would save a broken LoRA: refuse it."""
    if config.lora_rank is not None and distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"`--lora_rank` {config.lora_rank} cannot run under {distributed_type.value}: LoRA training supports "
            "one process or DDP (accelerate launch --multi_gpu, torchrun). Drop the FSDP/DeepSpeed config."
        )


def make_optimizer(trained: dict[str, torch.nn.Module], config: TrainConfig, num_processes: int):
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    params = trainable_parameters(trained)
    return torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def make_emas(accelerator: Accelerator, trained: dict, config: TrainConfig) -> dict[str, EMAModel]:
    if not config.use_ema:
        return {}
    emas = {name: EMAModel(module.parameters(), decay=config.ema_decay) for name, module in trained.items()}
    for ema in emas.values():
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)  # saved and restored by save_state/load_state
    return emas


def trainable_parameters(trained: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """What the optimizer steps: whole modules, or only their LoRA adapters (the rest is frozen)."""
    return [p for module in trained.values() for p in module.parameters() if p.requires_grad]


def refuse_to_mix_runs(config: TrainConfig) -> None:
    """A new run in a folder holding another run's checkpoints would prune them, and ``latest`` would mix the two."""
    if config.resume_from_checkpoint is not None:
        return
    checkpoints = checkpointing.list_checkpoints(config.run_dir)
    if checkpoints:
        raise ValueError(
            f"`--project_dir` {config.run_dir} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in checkpoints)}): pass `--resume_from_checkpoint latest` to continue it, "
            "or choose another `--project_dir`."
        )


def resume(accelerator: Accelerator, config: TrainConfig, state: RunState, stream: RecordStream) -> None:
    checkpoint = checkpointing.resolve_resume(config.resume_from_checkpoint, config.run_dir)
    if checkpoint is None:
        if config.resume_from_checkpoint:
            logger.info("No checkpoint in %s yet: starting a new run.", config.run_dir)
        return
    rank_state = checkpointing.load_rank_state(checkpoint, accelerator.process_index, accelerator.num_processes)
    check_same_run(rank_state["config"], run_settings(config, accelerator), checkpoint)
    accelerator.load_state(str(checkpoint))
    state.load_state_dict(rank_state, checkpointing.checkpoint_step(checkpoint))
    stream.resume(state.positions, batches_done=state.step * config.gradient_accumulation_steps)
    logger.info("Resumed from %s at step %d (%s so far)", checkpoint, state.step, state.bad.summary())


def check_same_run(saved: dict[str, str], now: dict[str, str], checkpoint: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same stage, seed, batch layout, tokenizer, precision."""
    # a checkpoint written before a setting was added to RESUME_MUST_MATCH lacks it: nothing to compare
    changed = [f"`--{key}` {saved[key]} -> {now[key]}" for key in saved if key in now and saved[key] != now[key]]
    if changed:
        raise ValueError(
            f"{checkpoint} belongs to a different run ({'; '.join(changed)}): resume with the settings it was "
            "written with, or start a new run with another `--project_dir`."
        )


def run_steps(
    accelerator, config, components, trained, emas, optimizer, lr_scheduler, loader, state, max_steps, validator=None
):
    """Optimizer steps until ``max_steps``: loss, backward, clip, step, EMA, log, checkpoint, validation."""
    params = trainable_parameters(trained)
    progress = tqdm(total=max_steps, initial=state.step, desc="Steps", disable=not accelerator.is_local_main_process)
    batches = iter(loader)
    step_loss = 0.0
    while state.step < max_steps:
        batch = next(batches)
        with accelerator.accumulate(*trained.values()):
            loss = batch_loss(accelerator, config, components, batch, state.generator)
            step_loss += accelerator.gather(loss.detach()).mean().item() / config.gradient_accumulation_steps
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        state.consume(batch)
        if not accelerator.sync_gradients:
            continue
        for name, ema in emas.items():
            ema.step(trained[name].parameters())
        state.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"The loss is {step_loss} at step {state.step}: lower `--learning_rate`.")
        accelerator.log({"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=state.step)
        step_loss = 0.0
        if state.step % config.checkpointing_steps == 0 or state.step == max_steps:
            save(accelerator, config, state)
        if validator is not None and validator.due(state.step, max_steps):
            validator.run(state.step)
    progress.close()


def batch_loss(accelerator, config, components, batch, generator) -> torch.Tensor:
    texts = drop_captions(batch["text"], config.caption_dropout, generator)
    input_ids = tokenize(components["tokenizer"], texts).to(accelerator.device)
    if isinstance(config, DistillConfig):
        return distill_step.distillation_loss(
            unet=components["unet"],
            lora_unet=components["lora_unet"],
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            noise_scheduler=components["noise_scheduler"],
            solver=components["solver"],
            pixel_values=batch["pixel_values"].to(accelerator.device, non_blocking=True),
            input_ids=input_ids,
            uncond_ids=tokenize(components["tokenizer"], [""] * len(texts)).to(accelerator.device),
            generator=generator,
            w_min=config.w_min,
            w_max=config.w_max,
            loss_type=config.loss_type,
            huber_c=config.huber_c,
            timestep_scaling=config.timestep_scaling_factor,
            latent_cache=components.get("latent_cache"),
        )
    return diffusion_loss(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        noise_scheduler=components["noise_scheduler"],
        pixel_values=batch["pixel_values"].to(accelerator.device, non_blocking=True),
        input_ids=input_ids,
        generator=generator,
        snr_gamma=config.snr_gamma,
        latent_cache=components.get("latent_cache"),
    )


def save(accelerator: Accelerator, config: TrainConfig, state: RunState) -> None:
    path = checkpointing.save_checkpoint(
        accelerator,
        config.run_dir,
        state.step,
        state.state_dict(accelerator.num_processes, run_settings(config, accelerator)),
        total_limit=config.checkpoints_total_limit,
    )
    logger.info("Saved %s", path)
    report_bad_records(accelerator, state, f"by step {state.step}")


def report_bad_records(accelerator: Accelerator, state: RunState, when: str) -> BadRecords:
    """Sum the skipped records of all processes (a collective call), log them and return them."""
    merged = BadRecords.merged(gather_object([state.bad.state_dict()]))
    logger.info("Data %s: %s", when, merged.summary())
    accelerator.log({"bad_records": merged.total}, step=state.step)
    return merged


def full_modules(accelerator: Accelerator, trained: dict) -> dict[str, torch.nn.Module]:
    """The trained modules, whole (every process calls this).

    The FSDP / DeepSpeed branch gathers the shards with ``accelerator.get_state_dict``. It is UNTESTED:
    accelerate 1.15 selects FSDP only for processes on GPUs (its ``ACCELERATE_USE_FSDP`` switch sits in
    the multi-GPU branch of ``AcceleratorState``; CPU processes are ``MULTI_CPU``) and DeepSpeed only
    without ``cpu``, so no CPU test can reach it, and no GPU run has yet. :func:`log_setup` says so.
    """
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return {name: accelerator.unwrap_model(model) for name, model in trained.items()}
    full = {}
    for name, model in trained.items():
        state = accelerator.get_state_dict(model)  # a collective call: all processes take part
        module = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            if isinstance(module, ModelMixin):
                fresh = type(module).from_config(module.config)
            else:
                fresh = type(module)(module.config)
            fresh.load_state_dict(state)
            full[name] = fresh
    return full


def served_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a trained module in the served dtype, on the CPU, in eval mode; the module itself is left as is."""
    # The copy may briefly sit on the GPU: in the memory the gradients (freed by zero_grad) held in training.
    # torch's own cast: diffusers' ModelMixin.to warns about fp32-kept modules even when there are none
    # (none of the trained classes keeps any, see jsd.convert).
    return torch.nn.Module.to(copy.deepcopy(module), "cpu", SERVED_DTYPE).eval()


def export_served(
    source_folder: Path,
    output_dir: Path,
    trained: dict[str, torch.nn.Module],
    tokenizer,
    *,
    source: str,
    revision: str,
    prediction_type: str | None = None,
) -> Path:
    """Write the served layout (fp16 safetensors + manifest) atomically: a complete folder or none.

    Everything is saved in :data:`jsd.convert.SERVED_DTYPE`, like a downloaded checkpoint: the
    trained modules as cast copies (they keep their own dtype), the others loaded from
    ``source_folder`` in it. Every weight is checked to be finite after the cast.
    ``prediction_type`` (when training overrode it) goes into the saved scheduler config, or the
    served model would sample with the wrong target.
    """
    components = load_components(source_folder, torch_dtype=SERVED_DTYPE, load_safety_checker=True)
    if prediction_type:
        scheduler = components["scheduler"]
        components["scheduler"] = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    components |= {name: served_copy(module) for name, module in trained.items()}
    components["tokenizer"] = tokenizer
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            origin = f"the trained {name}" if name in trained else source_folder / name
            try:
                _check_finite(name, [origin], module)
            except ConversionError as err:
                raise FloatingPointError(f"{output_dir} was not written: {err}") from err
    pipe = JapaneseStableDiffusionPipeline(
        **components, requires_safety_checker=components["safety_checker"] is not None
    )
    # The same hidden staging name as jsd.convert (scripts/push.sh refuses to push with one left over).
    staging = output_dir.parent / f".{output_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    write_manifest(staging, source=source, revision=revision)
    swap_into_place(staging, output_dir)
    logger.info("Saved the served layout to %s (load it with JSD_WEIGHTS=%s)", output_dir, output_dir)
    return output_dir
