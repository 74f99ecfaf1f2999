"""Build the toy checkpoint from scratch: the toy world's data, a small VAE, then jsd's own recipe.

``scripts/train_toy.py`` runs :func:`build`. The steps, all seeded:

1. data: the toy world's training scenes (held-out combinations excluded) as an image folder with
   ``metadata.jsonl`` and as WebDataset shards;
2. the VAE (the one piece jsd's recipe does not train): a small ``AutoencoderKL`` that downsamples by 4
   (128 px images, 32×32 latents), trained here on the images alone; its ``scaling_factor`` is set so
   that latents have unit variance, as SD v1's 0.18215 does;
3. the starting checkpoint in the served layout: that VAE, a tiny ``CLIPTextModel`` on rinna's 32,000
   piece tokenizer, a small ``UNet2DConditionModel`` (both random), PNDM, a never-flagging tiny safety checker;
4. ``scripts/train.py``'s stage 2 as shipped (``configs/train/stage2.json``), twice, each a subprocess:

   * ``base``: text encoder and UNet jointly from random weights, no EMA, a high learning rate;
   * ``stage2``: the same stage on the WebDataset shards with EMA, a lower learning rate: the finishing run.

   Why not stage 1 (a new text encoder under a UNet that already draws): docs/toy-world.md. Learning
   rates, warm-up, batch size, prediction type (v), Min-SNR weighting where the plan asks for it and EMA
   decay are set on the command line for a run of minutes instead of weeks; every other setting is the stage's.
5. the result is copied to ``toy/weights`` (rinna's tokenizer with its NOTICE, manifest rewritten to
   say it is the toy model) and the loss of every step goes to ``toy/training-log.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
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


@dataclass
class Plan:
    """Every number of a build; the defaults are the committed toy checkpoint's."""

    seed: int = 0
    num_images: int = 4000
    vae_steps: int = 600
    vae_batch_size: int = 8  # whole pictures: a crop of a picture is mostly background
    vae_learning_rate: float = 1e-3
    vae_shape_weight: float = 10.0  # the shape's pixels weigh this much more than the background's
    # (name, config file, steps, learning rate, extra flags)
    stages: list[tuple[str, str, int, float, list[str]]] = field(
        default_factory=lambda: [
            ("base", "configs/train/stage2.json", 600, 1e-3, ["--no-use_ema"]),
            ("stage2", "configs/train/stage2.json", 150, 3e-4, ["--ema_decay", "0.99"]),
        ]
    )
    train_batch_size: int = 32
    # train.py's default warm-up is 500 steps: most of a 700-step stage (the builds before 2026-12-07 ran so)
    lr_warmup_steps: int = 20
    # v-prediction: at high noise its target is the picture itself, so what the caption decides (background,
    # color, place) weighs in the loss; epsilon's loss barely changes with it (docs/toy-world.md, measured)
    prediction_type: str = "v_prediction"
    snr_gamma: float | None = None  # Min-SNR weighting (diffusers' --snr_gamma); None: plain MSE
    eval_prompts: int = 24  # seen scenes drawn after every stage (and held-out ones at the end)
    eval_steps: int = 25

    def scaled(self, factor: float) -> Plan:
        """The same plan with every step count times ``factor`` (a quick check of the whole build)."""
        stages = [(n, c, max(1, round(steps * factor)), lr, extra) for n, c, steps, lr, extra in self.stages]
        return replace(self, vae_steps=max(1, round(self.vae_steps * factor)), stages=stages)


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
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        # attention only at 8×8 (at 32×32 and 16×16 it would cost most of every step): words reach the UNet there
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 96),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
        "cross_attention_dim": 64,
        # the caption, pooled by attention, joins the timestep embedding of every ResNet (diffusers' "text"
        # addition embedding, as in UnCLIP/IF): global choices (background, color) need not wait for the
        # cross-attention at 8×8 to learn them. Measured after 300 steps of 32: shuffling the captions raises
        # the high-noise loss by 75 % with it, by 4 % without; the judge reads 79 % of backgrounds vs 42 %.
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 4,
    }


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
        batch = pixels[index].float() / 127.5 - 1.0
        weight = reconstruction_weight(batch, plan.vae_shape_weight)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        recon = vae.decode(latents).sample
        error = recon - batch
        loss = (weight * (error.abs() + error**2)).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append({"stage": "vae", "step": step, "loss": round(loss.item(), 6)})
        if step % 25 == 0 or step == plan.vae_steps:
            progress(f"vae step {step}/{plan.vae_steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(pixels[i : i + 32].float() / 127.5 - 1.0).latent_dist.mean
                for i in range(0, min(128, len(pixels)), 32)
            ]
        )
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    progress(f"vae scaling_factor {scaling:.5f}")
    return vae


def write_start_checkpoint(dest: Path, vae: AutoencoderKL, tokenizer_model: Path, seed: int) -> Path:
    """The starting point in the served layout: trained VAE, random text encoder and UNet (fp32)."""
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
        scheduler=sd_v1_scheduler(),
        safety_checker=safety_checker.eval(),
        feature_extractor=CLIPImageProcessorPil(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True
        ),
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    write_manifest(dest, source=f"{TOY_SOURCE_PREFIX} start seed={seed}", revision=f"start-seed{seed}")
    return dest


def stage_command(repo: Path, name: str, config: str, steps: int, lr: float, extra: list[str], *, start: Path,
                  data: dict[str, object], out: Path, plan: Plan, train_script: Path) -> list[str]:  # fmt: skip
    """The command line of one stage through ``train_script`` (the recipe's ``train.py``, passed in by the caller
    so the library runs nothing of the scripts folder itself; the shards feed stage 2, the folder the others)."""
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
        "--checkpointing_steps", str(steps),
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


def build(repo: Path, work: Path, dest: Path, tokenizer_model: Path, plan: Plan, *, stop_after: str | None = None,
          vae_stop_at: int | None = None, train_script: Path | None = None, progress=print) -> dict:  # fmt: skip
    """Run every step; returns the training log (also written to ``dest.parent / LOG_FILE`` when complete).

    ``train_script`` is the recipe's ``train.py`` that runs the stages (needed unless ``stop_after="vae"``)."""
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    data = {"folder": work / "data", "shards": []}
    shutil.rmtree(data["folder"], ignore_errors=True)
    items = list(examples(plan.num_images, seed=plan.seed))
    write_image_folder(data["folder"], items)
    data["shards"] = [str(p) for p in write_shards(work / "shards", items, per_shard=1000)]
    progress(f"data: {len(items)} pictures in {data['folder']} and {len(data['shards'])} shards")
    vae = train_vae(data["folder"], plan, log, progress, stop_at=vae_stop_at)
    start = write_start_checkpoint(work / "start", vae, tokenizer_model, plan.seed)
    result = {"plan": _plan_json(plan), "steps": log, "stages": [], "stage_adherence": []}
    if stop_after == "vae":
        return result
    result["vae_round_trip"] = vae_round_trip(vae)
    progress(f"vae round trip, read by the judge: {result['vae_round_trip']}")
    if train_script is None:
        raise ValueError("build() needs `train_script` (the recipe's train.py) to run the stages")
    seen = sample_scenes(plan.eval_prompts, seed=plan.seed + 1)

    def evaluate(name: str, folder: Path) -> dict:
        share = adherence(folder, seen, steps=plan.eval_steps)
        result["stage_adherence"].append({"name": name, **share})
        progress(f"{name}: adherence on {len(seen)} seen prompts {share}")
        return share

    evaluate("start", start)
    for name, config, steps, lr, extra in plan.stages:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"{name}-run", ignore_errors=True)
        command = stage_command(
            repo, name, config, steps, lr, extra, start=start, data=data, out=out, plan=plan, train_script=train_script
        )
        progress(f"{name}: {' '.join(command[1:])}")
        subprocess.run(command, check=True, cwd=repo)
        losses = read_losses(work / f"{name}-run")
        log.extend({"stage": name, "step": i + 1, "loss": loss} for i, loss in enumerate(losses))
        result["stages"].append({"name": name, "command": _portable(command[1:], repo, work)})
        progress(f"{name}: {steps} steps, last loss {losses[-1] if losses else float('nan'):.4f}")
        start = out
        evaluate(name, out)
        if stop_after == name:
            return result
    result["adherence"] = {
        "seen": result["stage_adherence"][-1],
        "held_out": adherence(start, sample_scenes(plan.eval_prompts, seed=plan.seed + 2, pool=held_out_scenes())),
    }
    progress(f"held-out combinations: {result['adherence']['held_out']}")
    publish(start, dest, tokenizer_model, plan)
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    (dest.parent / LOG_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


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
    from dataclasses import asdict

    return asdict(plan)


def _portable(command: list[str], repo: Path, work: Path) -> list[str]:
    return [a.replace(str(repo) + "/", "").replace(str(work), "WORK") for a in command]
