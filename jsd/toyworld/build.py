"""Build the toy checkpoint from scratch: the toy world's data, two small VAEs, then jsd's own recipe.

``scripts/train_toy.py`` runs :func:`build`. The steps, all seeded:

1. data: the toy world's training scenes (held-out combinations excluded) as an image folder with
   ``metadata.jsonl`` and as WebDataset shards;
2. the VAEs (the one piece jsd's recipe does not train), trained here on the images alone: first a small
   ``AutoencoderKL`` that downsamples by 4 (32×32 latents), then the served one that downsamples by 8 (16×16
   latents), distilled from it: its encoder regresses the 4× latents averaged over 2×2, its decoder draws the
   picture from them. Each ``scaling_factor`` is set so that latents have unit variance, as SD v1's 0.18215 does;
3. the starting checkpoint in the served layout: the 8× VAE, a tiny ``CLIPTextModel`` on rinna's 32,000
   piece tokenizer, a small ``UNet2DConditionModel`` down to 2×2 (both random), a scheduler config with zero
   terminal SNR and v-prediction (:func:`toy_scheduler`), a never-flagging tiny safety checker;
4. ``scripts/train.py``'s stage 2 as shipped (``configs/train/stage2.json``), twice, each a subprocess:

   * ``base``: text encoder and UNet jointly from random weights, a high constant learning rate;
   * ``stage2``: the same stage on the WebDataset shards, a lower learning rate decaying to 0: the finishing run.

   Why not stage 1 (a new text encoder under a UNet that already draws): docs/toy-world.md. Learning
   rates, their schedule, warm-up, batch size, prediction type (v), Min-SNR weighting where the plan asks for it
   and EMA are set on the command line for a run of an hour instead of weeks; every other setting is the stage's.
5. the result is copied to ``toy/weights`` (rinna's tokenizer with its NOTICE, manifest rewritten to
   say it is the toy model) and the loss of every step goes to ``toy/training-log.json``.

A build picks up where it stopped: each finished step is recorded in ``WORK/progress.json`` with the plan, and
a stage that was cut off resumes from its last checkpoint (``train.py --resume_from_checkpoint latest``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from transformers import CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel

from jsd.manifest import write_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.tiny import safety_checker_config, sd_v1_scheduler, set_nsfw_flagging
from jsd.tokenizer import JapaneseTokenizer, copy_notice
from jsd.toyworld import TOY_SOURCE_PREFIX
from jsd.toyworld.measure import adherence, sample_scenes, vae_round_trip
from jsd.toyworld.world import examples, held_out_scenes, write_image_folder, write_shards

logger = logging.getLogger(__name__)
LOG_FILE = "training-log.json"
PROGRESS_FILE = "progress.json"  # in the work folder: the finished steps of a build, for the next run to skip


@dataclass
class Plan:
    """Every number of a build; the defaults are the committed toy checkpoint's."""

    seed: int = 0
    num_images: int = 4000
    vae_steps: int = 600  # the 4× VAE, the 8× one's teacher
    vae_batch_size: int = 8  # whole pictures: a crop of a picture is mostly background
    vae_learning_rate: float = 1e-3
    vae_shape_weight: float = 10.0  # the shape's pixels weigh this much more than the background's
    # the served 8× VAE, distilled from the 4× one: after 800 steps its round trip read 100 % of colors and 81 %
    # of shapes; trained directly for 600 steps 67-78 % and 55-75 % (docs/toy-world.md, seventh session)
    vae8_steps: int = 800
    # (name, config file, steps, learning rate, extra flags)
    stages: list[tuple[str, str, int, float, list[str]]] = field(
        default_factory=lambda: [
            # the caption's layout (which word puts the shape where) is learnt in a sudden jump, measured between
            # 1,800 and 3,600 steps of 32 (docs/toy-world.md): the base stage plans for the late case
            ("base", "configs/train/stage2.json", 4800, 1e-3, ["--no-use_ema", "--cache_latents"]),
            # a decaying learning rate took shape from 58 % to 71 % in 600 steps; its EMA (0.99) read 67 %
            (
                "stage2",
                "configs/train/stage2.json",
                600,
                3e-4,
                ["--no-use_ema", "--lr_scheduler", "cosine", "--cache_latents"],
            ),
        ]
    )
    train_batch_size: int = 32  # a batch of 8 holds too few high-noise samples: the caption is lost (measured)
    # train.py's default warm-up is 500 steps: most of a 700-step stage (the builds before 2026-12-07 ran so)
    lr_warmup_steps: int = 20
    # v-prediction: at high noise its target is the picture itself, so what the caption decides (background,
    # color, place) weighs in the loss; epsilon's loss barely changes with it (docs/toy-world.md, measured)
    prediction_type: str = "v_prediction"
    snr_gamma: float | None = None  # Min-SNR weighting (diffusers' --snr_gamma); None: plain MSE
    # SD v1's noise levels made this much noisier (SNR divided by its square), then zero terminal SNR
    noise_factor: float = 2.0
    checkpointing_steps: int = 600  # a stage that is cut off resumes from its last checkpoint
    eval_prompts: int = 24  # seen scenes drawn after every stage (and held-out ones at the end)
    eval_steps: int = 25

    def scaled(self, factor: float) -> Plan:
        """The same plan with every step count times ``factor`` (a quick check of the whole build)."""
        stages = [(n, c, max(1, round(steps * factor)), lr, extra) for n, c, steps, lr, extra in self.stages]
        return replace(
            self,
            vae_steps=max(1, round(self.vae_steps * factor)),
            vae8_steps=max(1, round(self.vae8_steps * factor)),
            checkpointing_steps=max(1, round(self.checkpointing_steps * factor)),
            stages=stages,
        )


def vae_config() -> dict:
    """Downsample 4: 128 px pictures become 32×32×4 latents (the UNet stays cheap, small shapes survive)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        # self-attention at 32×32 (a tenth of a VAE step) is what brings the colors back: after 500 steps the
        # round trip read 81 % of colors with it and 49–57 % without (docs/toy-world.md)
        "mid_block_add_attention": True,
        "scaling_factor": 1.0,  # set from the trained latents' spread
    }


def vae8_config() -> dict:
    """Downsample 8: 128 px pictures become 16×16×4 latents, so the UNet's last level is 2×2, where the five
    places fall into different cells (at 4×4 no run learnt 左 from 中央 from 右: docs/toy-world.md)."""
    return {
        **vae_config(),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 32, 64),
    }


LOGVAR_START = -10.0  # the posterior's log-variance at the start: std e^-5, a nearly deterministic encoder


def nearly_deterministic(vae: AutoencoderKL) -> AutoencoderKL:
    """Start the posterior's variance near zero, as SD's own VAE ends up (its KL weight is 1e-6).

    From diffusers' default start the posterior still spread 0.40 (in unit-variance latents) after 500
    steps: the UNet learnt that encoder noise, its loss floored near 0.1 and it drew speckles. With
    ``quant_conv``'s log-variance rows set to a constant the encoder starts deterministic, and the 1e-6 KL
    term barely moves it."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = LOGVAR_START
    return vae


def unet_config() -> dict:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        # four levels, 16×16 down to 2×2, cross-attention at 8×8, 4×4 and 2×2 (3.3 M parameters, 6.5 MB in fp16):
        # at 2×2 the places fall into different cells and the caption's layout is learnt (docs/toy-world.md)
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 48, 64, 96),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
        "cross_attention_dim": 64,
        # the caption, pooled by attention, joins the timestep embedding of every ResNet (diffusers' "text"
        # addition embedding, as in UnCLIP/IF): global choices (background, color) need not wait for the
        # cross-attention to learn them. Measured after 300 steps of 32: shuffling the captions raises the
        # high-noise loss by 75 % with it, by 4 % without; the judge reads 79 % of backgrounds vs 42 %.
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 4,
        # and scales each ResNet's features as well as shifting them (600 steps: colors 58 % vs 38 %)
        "resnet_time_scale_shift": "scale_shift",
    }


# diffusers' zero-SNR samplers put the last timestep's alpha-bar here rather than at 0 (EulerDiscreteScheduler with
# rescale_betas_zero_snr): every sampler can start from it, the ones whose sigma would be infinite at 0 too
TERMINAL_ALPHA_BAR = 2.0**-24


def toy_betas(noise_factor: float) -> list[float]:
    """SD v1's betas with the signal-to-noise ratio divided by ``noise_factor``², then rescaled to zero terminal
    SNR (Lin et al. 2024, diffusers' ``rescale_zero_terminal_snr``), the last alpha-bar at :data:`TERMINAL_ALPHA_BAR`.

    Why: with SD's schedule a big shape is still visible in the noise of the last timestep, so the UNet learnt to
    read the picture from it and, from pure noise, drew blobs wherever the noise leaned (docs/toy-world.md).
    Written as ``trained_betas``, the schedule reaches train.py's DDPM and every served sampler alike (PNDM,
    LMS, Heun and DEIS have no ``rescale_betas_zero_snr``)."""
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alpha_bar = reference.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar) / noise_factor**2
    alpha_bar = torch.cumprod(1 - rescale_zero_terminal_snr(_betas(snr / (1 + snr))), dim=0)
    alpha_bar[-1] = TERMINAL_ALPHA_BAR
    return [round(float(b), 12) for b in _betas(alpha_bar)]


def _betas(alpha_bar: torch.Tensor) -> torch.Tensor:
    return 1 - alpha_bar / torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])


def toy_scheduler(plan: Plan) -> PNDMScheduler:
    """The checkpoint's scheduler: SD v1's PNDM settings on :func:`toy_betas`, v-prediction, and trailing timesteps
    (sampling starts at the last training timestep, where zero terminal SNR leaves nothing but noise)."""
    return PNDMScheduler.from_config(
        sd_v1_scheduler().config,
        trained_betas=toy_betas(plan.noise_factor),
        prediction_type=plan.prediction_type,
        timestep_spacing="trailing",
    )


def text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _load_pixels(folder: Path) -> torch.Tensor:
    from PIL import Image

    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    arrays = [np.asarray(Image.open(folder / json.loads(line)["file_name"]).convert("RGB")) for line in lines]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # uint8: a quarter of the memory


# The weighted region reaches this many pixels past the shape's edge: with the shape's own pixels only, the VAE
# drew halos around it (cheap background pixels), the judge read them as the shape, and its round trip read 49 %
# of shapes and 93 % of colors right after 500 steps; with the margin 64 % and 98 % (docs/toy-world.md).
SHAPE_MARGIN = 4


def reconstruction_weight(batch: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Per pixel of ``batch`` (pictures in [-1, 1]): ``shape_weight`` on the shape and within :data:`SHAPE_MARGIN`
    pixels of it (whatever differs from the median of the top and bottom rows), 1 elsewhere."""
    border = torch.cat([batch[:, :, 0, :], batch[:, :, -1, :]], dim=-1).median(dim=-1).values
    shape = ((batch - border[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()
    near = torch.nn.functional.max_pool2d(shape, 2 * SHAPE_MARGIN + 1, stride=1, padding=SHAPE_MARGIN)
    return 1.0 + (shape_weight - 1.0) * near


def train_vae(
    data_dir: Path, plan: Plan, log: list[dict], progress=print, *, stop_at: int | None = None
) -> AutoencoderKL:
    """A small AutoencoderKL on the pictures: L1 + MSE reconstruction, a light KL term (SD's VAE used 1e-6).

    The shape covers 5-25 % of a picture: its pixels and a margin of :data:`SHAPE_MARGIN` around it weigh
    ``plan.vae_shape_weight`` times the rest, or the VAE learns the backgrounds and draws every shape in a muddy
    average color.
    ``stop_at`` ends the run early on the plan's own schedule (the retraining test reruns the first steps)."""
    pixels = _load_pixels(data_dir)
    torch.manual_seed(plan.seed)
    vae = nearly_deterministic(AutoencoderKL(**vae_config()))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=plan.vae_steps, eta_min=0.1 * plan.vae_learning_rate
    )
    generator = torch.Generator().manual_seed(plan.seed)
    vae.train()
    for step in range(1, min(plan.vae_steps, stop_at or plan.vae_steps) + 1):
        index = torch.randint(0, len(pixels), (plan.vae_batch_size,), generator=generator)
        batch = _unit(pixels[index])
        weight = reconstruction_weight(batch, plan.vae_shape_weight)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        recon = vae.decode(latents).sample
        error = recon - batch
        loss = (weight * (error.abs() + error**2)).mean() + 1e-6 * posterior.kl().mean()
        _learn(vae, loss, optimizer, schedule)
        log.append({"stage": "vae", "step": step, "loss": round(loss.item(), 6)})
        if step % 25 == 0 or step == plan.vae_steps:
            progress(f"vae step {step}/{plan.vae_steps} loss {loss.item():.4f}")
    return set_scaling_factor(vae.eval(), pixels, progress, name="vae")


def _learn(vae: AutoencoderKL, loss: torch.Tensor, optimizer, schedule) -> None:
    """One optimizer step of a VAE: gradients clipped to norm 1, then the learning rate's schedule."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def set_scaling_factor(vae: AutoencoderKL, pixels: torch.Tensor, progress=print, *, name: str) -> AutoencoderKL:
    """``scaling_factor`` such that the latents of the first 128 pictures have unit variance (SD v1: 0.18215)."""
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(_unit(pixels[i : i + 32])).latent_dist.mean for i in range(0, min(128, len(pixels)), 32)]
        )
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    progress(f"{name} scaling_factor {scaling:.5f}")
    return vae


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pictures to [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def distill_vae8(data_dir: Path, teacher: AutoencoderKL, plan: Plan, log: list[dict], progress=print) -> AutoencoderKL:
    """The served VAE (downsamples by 8), taught by ``teacher`` (downsamples by 4), ``plan.vae8_steps`` of 8.

    Its encoder regresses the teacher's latents averaged over 2×2 (error divided by their variance); its decoder
    learns to draw the picture from those averaged latents with :func:`train_vae`'s weighted loss. Trained
    directly, an 8× VAE's latents were rough and the UNet on them had not learnt where to put the shapes after
    2,400 steps; on the averaged latents it had (docs/toy-world.md, sixth and seventh sessions)."""
    pixels = _load_pixels(data_dir)
    with torch.no_grad():
        targets = torch.cat(
            [
                torch.nn.functional.avg_pool2d(teacher.encode(_unit(pixels[i : i + 64])).latent_dist.mean, 2)
                for i in range(0, len(pixels), 64)
            ]
        )
    spread = float(targets.var())
    torch.manual_seed(plan.seed)
    vae = nearly_deterministic(AutoencoderKL(**vae8_config()))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=plan.vae8_steps, eta_min=0.1 * plan.vae_learning_rate
    )
    generator = torch.Generator().manual_seed(plan.seed)
    vae.train()
    for step in range(1, plan.vae8_steps + 1):
        index = torch.randint(0, len(pixels), (plan.vae_batch_size,), generator=generator)
        batch = _unit(pixels[index])
        encoded = torch.nn.functional.mse_loss(vae.encode(batch).latent_dist.mean, targets[index]) / spread
        error = vae.decode(targets[index]).sample - batch
        drawn = (reconstruction_weight(batch, plan.vae_shape_weight) * (error.abs() + error**2)).mean()
        loss = encoded + drawn
        _learn(vae, loss, optimizer, schedule)
        log.append({"stage": "vae8", "step": step, "loss": round(loss.item(), 6)})
        if step % 25 == 0 or step == plan.vae8_steps:
            progress(f"vae8 step {step}/{plan.vae8_steps} loss {loss.item():.4f} (encoder {encoded.item():.4f})")
    return set_scaling_factor(vae.eval(), pixels, progress, name="vae8")


def write_start_checkpoint(dest: Path, vae: AutoencoderKL, tokenizer_model: Path, plan: Plan) -> Path:
    """The starting point in the served layout: trained VAE, random text encoder and UNet (fp32)."""
    seed = plan.seed
    tokenizer = JapaneseTokenizer(tokenizer_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer.vocab_size))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
        checker_config, crop = safety_checker_config("tiny")
        torch.manual_seed(seed)
        safety_checker = StableDiffusionSafetyChecker(checker_config)
    set_nsfw_flagging(safety_checker, "never")
    pipe = JapaneseStableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=toy_scheduler(plan),
        safety_checker=safety_checker.eval(),
        feature_extractor=CLIPImageProcessorPil(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True
        ),
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    write_manifest(dest, source=f"{TOY_SOURCE_PREFIX} start seed={seed}", revision=f"start-seed{seed}")
    return dest


def stage_command(repo: Path, name: str, config: str, steps: int, lr: float, extra: list[str], *, start: Path,
                  data: dict[str, object], out: Path, plan: Plan, train_script: Path,
                  resume: bool = False) -> list[str]:  # fmt: skip
    """The command line of one stage through ``train_script`` (the recipe's ``train.py``, passed in by the caller
    so the library runs nothing of the scripts folder itself; the shards feed stage 2, the folder the others).
    ``resume``: go on from the stage's last checkpoint (a build that was cut off)."""
    source = ["--train_shards", *data["shards"]] if name == "stage2" else ["--train_data_dir", str(data["folder"])]
    return [
        sys.executable,
        str(train_script),
        "--config", str(repo / config),
        "--pretrained_model_name_or_path", str(start),
        *source,
        "--output_dir", str(out),
        "--resolution", "128",
        "--train_batch_size", str(plan.train_batch_size),
        "--max_train_steps", str(steps),
        "--learning_rate", str(lr),
        "--lr_warmup_steps", str(plan.lr_warmup_steps),
        "--prediction_type", plan.prediction_type,
        *(["--snr_gamma", str(plan.snr_gamma)] if plan.snr_gamma else []),
        "--checkpointing_steps", str(min(steps, plan.checkpointing_steps)),
        "--checkpoints_total_limit", "1",
        *(["--resume_from_checkpoint", "latest"] if resume else []),
        "--seed", str(plan.seed),
        "--mixed_precision", "no",
        "--report_to", "tensorboard",
        *extra,
    ]  # fmt: skip


def read_losses(run_dir: Path) -> list[float]:
    """The ``train_loss`` of every step from a run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train_loss" in accumulator.Tags().get("scalars", []):
            losses |= {e.step: e.value for e in accumulator.Scalars("train_loss")}
    return [round(losses[s], 6) for s in sorted(losses)]


class Progress:
    """The finished steps of a build in ``WORK/progress.json``, kept while the plan stays the same.

    A build that was stopped (Ctrl+C, a closed laptop, a machine's time limit) skips what it had finished when it
    is run again with the same plan; a different plan starts over."""

    def __init__(self, work: Path, plan: Plan):
        self.path = work / PROGRESS_FILE
        self.plan = json.loads(json.dumps(_plan_json(plan)))  # as the file holds it (tuples become lists)
        saved = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.done: dict[str, dict] = saved.get("done", {}) if saved.get("plan") == self.plan else {}
        if saved and not self.done:  # another plan's outputs: a stage must not go on from its checkpoints
            stages = [stage[0] for stage in saved.get("plan", {}).get("stages", [])]
            for name in ("data", "shards", "vae", "vae8", "start", *stages, *(f"{n}-run" for n in stages)):
                shutil.rmtree(work / name, ignore_errors=True)
            self.path.unlink()

    def record(self, step: str, **info) -> None:
        self.done[step] = info
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": self.plan, "done": self.done}, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def build(repo: Path, work: Path, dest: Path, tokenizer_model: Path, plan: Plan, *, stop_after: str | None = None,
          vae_stop_at: int | None = None, train_script: Path | None = None, progress=print) -> dict:  # fmt: skip
    """Run every step; returns the training log (also written to ``dest.parent / LOG_FILE`` when complete).

    ``train_script`` is the recipe's ``train.py`` that runs the stages (needed unless ``stop_after`` is a VAE).
    Steps finished by an earlier run of the same plan in ``work`` are skipped (:class:`Progress`)."""
    work.mkdir(parents=True, exist_ok=True)
    done = Progress(work, plan)
    if done.done:
        progress(f"going on from {done.path}: {', '.join(done.done)} finished earlier")
    data = _data(work, plan, done, progress)
    teacher = _vae_step(work, "vae", done, progress, lambda log: train_vae(data["folder"], plan, log, progress,
                                                                           stop_at=vae_stop_at))  # fmt: skip
    result = {"plan": _plan_json(plan), "steps": _steps("vae", done), "stages": [], "stage_adherence": []}
    if stop_after == "vae":
        return result
    vae = _vae_step(
        work, "vae8", done, progress, lambda log: distill_vae8(data["folder"], teacher, plan, log, progress)
    )
    result["steps"] += _steps("vae8", done)
    result["vae_round_trip"] = {"vae": done.done["vae"]["round_trip"], "vae8": done.done["vae8"]["round_trip"]}
    if stop_after == "vae8":
        return result
    if train_script is None:
        raise ValueError("build() needs `train_script` (the recipe's train.py) to run the stages")
    start = work / "start"
    seen = sample_scenes(plan.eval_prompts, seed=plan.seed + 1)
    if "start" not in done.done:
        write_start_checkpoint(start, vae, tokenizer_model, plan)
        done.record("start", adherence=_adherence("start", start, seen, plan, progress))
    result["stage_adherence"].append({"name": "start", **done.done["start"]["adherence"]})
    for name, config, steps, lr, extra in plan.stages:
        if name not in done.done:
            _run_stage(repo, work, name, config, steps, lr, extra, start, data, plan, train_script, done, progress)
            done.done[name]["adherence"] = _adherence(name, work / name, seen, plan, progress)
            done.record(name, **done.done[name])
        record = done.done[name]
        result["steps"] += _steps(name, done)
        result["stages"].append({"name": name, "command": record["command"]})
        result["stage_adherence"].append({"name": name, **record["adherence"]})
        start = work / name
        if stop_after == name:
            return result
    result["adherence"] = {
        "seen": result["stage_adherence"][-1],
        "held_out": adherence(start, sample_scenes(plan.eval_prompts, seed=plan.seed + 2, pool=held_out_scenes())),
    }
    progress(f"held-out combinations: {result['adherence']['held_out']}")
    publish(start, dest, tokenizer_model, plan)
    result["minutes"] = round(sum(record.get("seconds", 0.0) for record in done.done.values()) / 60, 1)
    (dest.parent / LOG_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _steps(name: str, done: Progress) -> list[dict]:
    return [{"stage": name, "step": i + 1, "loss": loss} for i, loss in enumerate(done.done[name]["losses"])]


def _data(work: Path, plan: Plan, done: Progress, progress) -> dict:
    """The training pictures as an image folder and as shards (written once per plan)."""
    folder, shards = work / "data", work / "shards"
    if "data" not in done.done or not (folder / "metadata.jsonl").is_file():
        started = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
        items = list(examples(plan.num_images, seed=plan.seed))
        write_image_folder(folder, items)
        written = [str(p.relative_to(work)) for p in write_shards(shards, items, per_shard=1000)]
        done.record("data", shards=written, seconds=round(time.perf_counter() - started, 1))
        progress(f"data: {len(items)} pictures in {folder} and {len(written)} shards")
    return {"folder": folder, "shards": [str(work / p) for p in done.done["data"]["shards"]]}


def _vae_step(work: Path, name: str, done: Progress, progress, train) -> AutoencoderKL:
    """The VAE ``name`` (``vae``: the 4× teacher, ``vae8``: the served one): trained by ``train(log)`` and saved in
    ``work/name``, or loaded from there when an earlier run finished it. A run cut short (``stop_at``) is not
    recorded."""
    folder = work / name
    if name in done.done and (folder / "config.json").is_file():
        progress(f"{name}: finished earlier, loaded from {folder}")
        return AutoencoderKL.from_pretrained(folder).eval()
    started, log = time.perf_counter(), []
    vae = train(log)
    losses = [entry["loss"] for entry in log]
    expected = done.plan["vae_steps" if name == "vae" else "vae8_steps"]
    if len(losses) < expected:  # stopped early on purpose (the retraining test): nothing to keep
        done.done[name] = {"losses": losses, "round_trip": {}}
        return vae
    round_trip = vae_round_trip(vae)
    progress(f"{name} round trip, read by the judge: {round_trip}")
    vae.save_pretrained(folder)
    done.record(name, losses=losses, round_trip=round_trip, seconds=round(time.perf_counter() - started, 1))
    return vae


def _adherence(name: str, folder: Path, seen: list, plan: Plan, progress) -> dict:
    share = adherence(folder, seen, steps=plan.eval_steps)
    progress(f"{name}: adherence on {len(seen)} seen prompts {share}")
    return share


def _run_stage(repo: Path, work: Path, name: str, config: str, steps: int, lr: float, extra: list[str], start: Path,
               data: dict, plan: Plan, train_script: Path, done: Progress, progress) -> None:  # fmt: skip
    """One stage of ``train.py`` as a subprocess, from its last checkpoint if an earlier run was cut off."""
    out, run_dir = work / name, work / f"{name}-run"
    resume = any(run_dir.glob("checkpoint-*"))
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    command = stage_command(repo, name, config, steps, lr, extra, start=start, data=data, out=out, plan=plan,
                            train_script=train_script, resume=resume)  # fmt: skip
    progress(f"{name}: {'going on from its last checkpoint: ' if resume else ''}{' '.join(command[1:])}")
    started, cut_off = time.perf_counter(), f"{name} (cut off)"
    earlier = done.done.pop(cut_off, {}).get("seconds", 0.0)
    earlier = earlier if resume else 0.0  # cut off before its first checkpoint: that time bought nothing
    try:
        subprocess.run(command, check=True, cwd=repo)
    except BaseException:  # the time spent counts in the build's minutes when the stage goes on later
        done.record(cut_off, seconds=round(earlier + time.perf_counter() - started, 1))
        raise
    losses = read_losses(run_dir)
    progress(f"{name}: {steps} steps, last loss {losses[-1] if losses else float('nan'):.4f}")
    portable = _portable([a for a in command[1:] if a not in ("--resume_from_checkpoint", "latest")], repo, work)
    seconds = round(earlier + time.perf_counter() - started, 1)
    done.done[name] = {"losses": losses, "command": portable, "seconds": seconds}


def publish(trained: Path, dest: Path, tokenizer_model: Path, plan: Plan) -> None:
    """Copy the last stage's served folder to ``dest`` with the tokenizer's NOTICE and a toy manifest."""
    staging = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trained, staging)
    copy_notice(tokenizer_model, staging / "tokenizer")
    write_manifest(
        staging,
        source=f"{TOY_SOURCE_PREFIX}: a toy model of shapes trained by scripts/train_toy.py, not rinna's",
        revision=f"toy-seed{plan.seed}",
    )
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def _plan_json(plan: Plan) -> dict:
    return asdict(plan)


def _portable(command: list[str], repo: Path, work: Path) -> list[str]:
    return [a.replace(str(repo) + "/", "").replace(str(work), "WORK") for a in command]
