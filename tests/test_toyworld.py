"""The toy world's generator and its pixel judge (jsd.toyworld): deterministic, readable by our trainer, accurate."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from repofiles import REPO, load_repo_module

from jsd.toyworld import judge, world
from jsd.training.data import ImageFolderSource, RecordStream, TarShardSource


def test_the_world_has_every_attribute_the_issue_names():
    assert set(world.SHAPES) >= {"丸", "三角", "四角", "星"}
    assert set(world.COLORS) >= {"赤", "青", "緑", "黄", "紫", "橙", "白", "黒"}
    assert set(world.POSITIONS) == {"左", "右", "上", "下", "中央"}
    assert set(world.SIZES) == {"大きい", "小さい"}
    assert set(world.BACKGROUNDS) == {"白", "黒", "灰色"}
    scenes = world.all_scenes()
    assert all(s.color != s.background for s in scenes)
    assert (
        len(scenes) == len(set(scenes)) == (7 + 7 + 8) * 4 * 5 * 2
    )  # 白 and 黒 shapes are never drawn on their own color


def test_held_out_combinations_never_reach_the_training_data():
    train = world.training_scenes()
    assert not {(s.color, s.shape) for s in train} & world.HELD_OUT
    assert {(s.color, s.shape) for s in world.held_out_scenes()} == world.HELD_OUT
    seen = {(e.scene.color, e.scene.shape) for e in world.examples(400, seed=3)}
    assert not seen & world.HELD_OUT


def test_generation_is_deterministic_per_seed():
    a = [(e.caption, e.image.tobytes()) for e in world.examples(20, seed=5)]
    b = [(e.caption, e.image.tobytes()) for e in world.examples(20, seed=5)]
    c = [(e.caption, e.image.tobytes()) for e in world.examples(20, seed=6)]
    assert a == b
    assert a != c


def test_captions_use_several_templates_and_spellings():
    captions = [e.caption for e in world.examples(300, seed=0)]
    assert any("赤い" in c for c in captions) and any("あかい" in c for c in captions)
    assert any("丸" in c for c in captions) and any("円" in c for c in captions)
    # every template shows up (they differ in where the background phrase sits)
    assert len({c.index("、") if "、" in c else -1 for c in captions}) > 3
    scene = world.Scene("白", "赤", "丸", "左", "大きい")
    assert scene.prompt() == "白い背景、左に大きい赤い丸"
    assert scene.caption(0, 1) == "白地、ひだりにおおきいあかい円"


def test_image_folder_and_shards_are_what_the_trainer_reads(tmp_path):
    items = list(world.examples(12, seed=1))
    folder = world.write_image_folder(tmp_path / "folder", items)
    shards = world.write_shards(tmp_path / "shards", items, per_shard=5)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    line = json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["text"] == items[0].caption and line["color"] == items[0].scene.color
    for source in (ImageFolderSource(folder), TarShardSource([str(p) for p in shards])):
        stream = RecordStream(source, resolution=128, random_flip=False, seed=0, rank=0, world_size=1, num_workers=0)
        samples = [s for _, s in zip(range(12), stream, strict=False)]
        assert sorted(s["text"] for s in samples) == sorted(e.caption for e in items)
        assert samples[0]["pixel_values"].shape == (3, 128, 128)
        assert not any(s["bad"] for s in samples)
    # the shard bytes do not depend on when they were written
    again = world.write_shards(tmp_path / "again", items, per_shard=5)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]


def test_the_judge_reads_the_generators_pictures_at_least_99_percent():
    items = list(world.examples(600, seed=11, scenes=world.all_scenes()))
    wrong: Counter[str] = Counter()
    for item in items:
        for name, ok in judge.read(item.image).matches(item.scene).items():
            wrong[name] += not ok
    accuracy = {name: 1 - wrong[name] / len(items) for name in judge.ATTRIBUTES}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_the_judge_sees_no_shape_on_an_empty_picture():
    from PIL import Image

    reading = judge.read(Image.new("RGB", (128, 128), world.BACKGROUNDS["灰色"]))
    assert reading == judge.Reading("灰色", None, None, None, None)


@pytest.mark.parametrize("attribute", judge.ATTRIBUTES)
def test_the_judge_tells_every_value_of_every_attribute_apart(attribute):
    base = world.Scene("灰色", "赤", "四角", "中央", "大きい")
    values = {
        "background": world.BACKGROUNDS,
        "color": world.COLORS,
        "shape": world.SHAPES,
        "position": world.POSITIONS,
        "size": world.SIZES,
    }[attribute]
    for value in values:
        scene = world.Scene(**{**base.__dict__, attribute: value})
        if scene.color == scene.background:
            continue
        assert getattr(judge.read(world.render(scene)), attribute) == value


def test_agreement_counts_per_attribute():
    scenes = [world.Scene("白", "青", "星", "右", "小さい"), world.Scene("黒", "黄", "丸", "上", "大きい")]
    images = [world.render(scenes[0]), world.render(scenes[0])]
    share = judge.agreement(images, scenes)
    assert share["color"] == 0.5 and share["shape"] == 0.5 and share["position"] == 0.5
    with pytest.raises(ValueError, match="2 images for 1 scenes"):
        judge.agreement(images, scenes[:1])


def test_the_judge_reads_the_new_color_with_the_extended_palette_only():
    """桜色, the word a LoRA learns (tests/test_toy_lora.py): drawn, read as 桜色 with ``COLORS | NEW_COLORS``;
    never in the training scenes."""
    scenes = [world.Scene(bg, "桜色", shape, pos, "大きい") for bg in world.BACKGROUNDS for shape in world.SHAPES
              for pos in world.POSITIONS]  # fmt: skip
    readings = [judge.read(world.render(s), world.COLORS | world.NEW_COLORS) for s in scenes]
    assert all(r.color == "桜色" and r.shape == s.shape for r, s in zip(readings, scenes, strict=True))
    assert all(judge.read(world.render(s)).color != "桜色" for s in scenes)  # the default palette has no 桜色
    assert "桜色" not in {s.color for s in world.all_scenes()}
    assert "桜色の" in scenes[0].prompt()


def test_a_corrupted_caption_changes_the_color_or_the_shape_and_nothing_else():
    import random

    rng = random.Random(0)
    changed = Counter()
    for scene in world.all_scenes()[::7]:
        wrong = world.corrupted(scene, rng)
        diff = {a for a in judge.ATTRIBUTES if getattr(wrong, a) != getattr(scene, a)}
        assert diff in ({"color"}, {"shape"}), (scene, wrong)
        assert wrong.color != wrong.background
        changed.update(diff)
    assert min(changed.values()) > 0.3 * sum(changed.values())  # both kinds, about half each


def test_the_toy_vae_encodes_nearly_deterministically_from_its_first_step(tmp_path):
    """The build's VAE starts (and after training steps stays) with a posterior spread far below its latents':
    from diffusers' default start the UNet learnt encoder noise and drew speckles (docs/toy-world.md)."""
    import numpy as np
    import torch

    from jsd.toyworld.build import Plan, train_vae

    folder = world.write_image_folder(tmp_path / "data", list(world.examples(8, seed=0)))
    vae = train_vae(folder, Plan(vae_steps=2, vae_batch_size=2), [], progress=lambda _: None)
    pictures = torch.stack([torch.from_numpy(np.array(e.image)) for e in world.examples(4, seed=1)])
    with torch.no_grad():
        posterior = vae.encode(pictures.permute(0, 3, 1, 2).float() / 127.5 - 1.0).latent_dist
    # diffusers' default start: a spread of about 1 (raw units), three times the means'
    assert float(posterior.std.max()) < 0.05 * float(posterior.mean.std())


def test_each_stage_command_is_one_train_py_accepts_with_the_plans_settings(tmp_path):
    """The build's stages run ``scripts/train.py``: every flag must parse, and the plan's settings must reach it
    (train.py's own 500-step warm-up once took most of a 700-step stage)."""
    from pathlib import Path

    from jsd.toyworld.build import Plan, stage_command
    from jsd.training.config import parse_config

    repo = Path(__file__).resolve().parents[1]
    plan = Plan(lr_warmup_steps=7, snr_gamma=3.0, train_batch_size=5)
    data = {"folder": tmp_path / "data", "shards": [str(tmp_path / "shard-000000.tar")]}
    for name, config, steps, lr, extra in plan.stages:
        command = stage_command(repo, name, config, steps, lr, extra, start=tmp_path / "start", data=data,
                                out=tmp_path / name, plan=plan, train_script=repo / "scripts" / "train.py")  # fmt: skip
        settings = parse_config(command[2:])
        assert (settings.lr_warmup_steps, settings.snr_gamma, settings.train_batch_size) == (7, 3.0, 5)
        assert (settings.prediction_type, settings.max_train_steps, settings.learning_rate) == (
            plan.prediction_type,
            steps,
            lr,
        )
        assert settings.resolution == 128 and settings.stage == 2
        assert (
            settings.checkpointing_steps == min(steps, plan.checkpointing_steps)
            and settings.checkpoints_total_limit == 1
        )
        assert settings.resume_from_checkpoint is None
        resumed = stage_command(repo, name, config, steps, lr, extra, start=tmp_path / "start", data=data, resume=True,
                                out=tmp_path / name, plan=plan, train_script=repo / "scripts" / "train.py")  # fmt: skip
        assert parse_config(resumed[2:]).resume_from_checkpoint == "latest"


def test_the_vae_weighs_the_shape_and_a_margin_around_it_over_the_background():
    """Weighting the shape's pixels only, the VAE drew cheap halos that the judge read as part of the shape."""
    import torch

    from jsd.toyworld.build import SHAPE_MARGIN, reconstruction_weight

    batch = torch.ones(1, 3, 64, 64)  # a white picture in [-1, 1]
    batch[:, 1:, 20:30, 20:30] = -1.0  # a red square
    weight = reconstruction_weight(batch, 10.0)[0, 0]
    assert float(weight[25, 25]) == 10.0  # on the shape
    assert float(weight[25, 32]) == 10.0  # two pixels outside its right edge
    assert float(weight[25, 30 + SHAPE_MARGIN + 3]) == 1.0  # the background beyond the margin
    assert float(weight[5, 5]) == 1.0


def test_the_vae_round_trip_reads_what_the_decoder_draws_not_the_input():
    """The build logs how much of a picture survives the VAE: the ceiling of what its UNet can draw."""
    from types import SimpleNamespace

    import torch

    from jsd.toyworld.measure import vae_round_trip

    def stand_in(decode):
        return SimpleNamespace(
            encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x.clone())),
            decode=lambda z: SimpleNamespace(sample=decode(z)),
        )

    exact = vae_round_trip(stand_in(lambda z: z), count=24)
    assert exact == {name: 1.0 for name in judge.ATTRIBUTES}
    swapped = vae_round_trip(stand_in(lambda z: z[:, [2, 1, 0]]), count=24)  # red and blue change places
    assert swapped["background"] == 1.0 and swapped["position"] == 1.0
    assert swapped["color"] < 0.8
    blank = vae_round_trip(stand_in(lambda z: torch.ones_like(z)), count=24)  # a white picture
    assert blank["color"] == 0.0


def test_the_toy_clip_build_says_what_it_is_and_carries_the_tokenizers_notice(tmp_path):
    """The converter records the builder's work folder as the scorer's source: the committed toy CLIP must say
    it is the toy one (as the toy checkpoint does) and carry rinna's NOTICE with their tokenizer."""
    import shutil
    from pathlib import Path

    from jsd.japanese_clip import JapaneseCLIPScorer
    from jsd.manifest import read_manifest, verify_manifest
    from jsd.toyworld import TOY_SOURCE_PREFIX, TOY_WEIGHTS
    from jsd.toyworld.clip import build_scorer

    repo = Path(__file__).resolve().parents[1]
    committed = repo / TOY_WEIGHTS / "japanese_clip" / "tokenizer"
    if not (committed / "spiece.model").is_file():
        pytest.skip("no committed toy Japanese CLIP (its tokenizer is rinna's, with the NOTICE)")
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(committed, tokenizer)
    dest = tmp_path / "weights"
    build_scorer(repo, tmp_path / "work", dest, tokenizer / "spiece.model", steps=2, seed=0,
                 convert_script=repo / "scripts" / "download_weights.py", progress=lambda _: None)  # fmt: skip
    scorer = dest / "japanese_clip"
    manifest = read_manifest(scorer)
    assert manifest["source"].startswith(TOY_SOURCE_PREFIX) and str(tmp_path) not in manifest["source"]
    assert (scorer / "tokenizer" / "NOTICE.md").read_bytes() == (tokenizer / "NOTICE.md").read_bytes()
    verify_manifest(scorer)  # the NOTICE is hashed with the rest
    JapaneseCLIPScorer.from_pretrained(scorer, device="cpu")


def test_the_toy_build_finds_rinnas_tokenizer_in_the_committed_clip_when_shared_is_absent(tmp_path):
    """A clone without ../shared builds the toy from the copy the committed toy CLIP carries."""
    from jsd.toyworld import TOY_WEIGHTS

    script = load_repo_module("scripts/train_toy.py")
    missing = tmp_path / "shared" / "google_sp.model"
    assert script.find_tokenizer(missing, tmp_path) is None  # nothing anywhere: the script says so and exits 2
    clip_copy = tmp_path / TOY_WEIGHTS / "japanese_clip" / "tokenizer" / "spiece.model"
    clip_copy.parent.mkdir(parents=True)
    clip_copy.write_bytes(b"piece model")
    assert script.find_tokenizer(missing, tmp_path) == clip_copy
    checkpoint_copy = tmp_path / TOY_WEIGHTS / "tokenizer" / "spiece.model"
    checkpoint_copy.parent.mkdir(parents=True)
    checkpoint_copy.write_bytes(b"piece model")
    assert script.find_tokenizer(missing, tmp_path) == checkpoint_copy  # the checkpoint's own copy first
    missing.parent.mkdir(parents=True)
    missing.write_bytes(b"piece model")
    assert script.find_tokenizer(missing, tmp_path) == missing  # the given file always wins
    assert (REPO / TOY_WEIGHTS / "japanese_clip" / "tokenizer" / "spiece.model").is_file()  # committed: the fallback


def test_the_toy_build_reads_the_tokenizer_from_a_copy_outside_the_folder_it_replaces(tmp_path):
    """The toy CLIP's committed copy lies in toy/weights, which publish() deletes before the CLIP is trained
    (the checkpoint's own copy comes back with the new checkpoint; the CLIP's would not)."""
    script = load_repo_module("scripts/train_toy.py")
    dest = tmp_path / "toy" / "weights" / "tokenizer"
    dest.mkdir(parents=True)
    (dest / "spiece.model").write_bytes(b"piece model")
    (dest / "NOTICE.md").write_text("rinna, Apache-2.0", encoding="utf-8")
    staged = script.stage_tokenizer(dest / "spiece.model", tmp_path / "work")
    shutil.rmtree(tmp_path / "toy")  # what publish() does to --dest
    assert staged.read_bytes() == b"piece model" and staged.parent.is_relative_to(tmp_path / "work")
    assert (staged.parent / "NOTICE.md").read_text(encoding="utf-8") == "rinna, Apache-2.0"  # it travels on


def test_publish_replaces_the_toy_weights_with_the_tokenizers_notice_and_a_toy_manifest(tmp_path):
    """What `scripts/train_toy.py` leaves in toy/weights: the last stage's folder, rinna's NOTICE beside its
    tokenizer (Apache-2.0), a manifest that says it is the toy model, nothing of the previous build."""
    from jsd.manifest import verify_manifest
    from jsd.toyworld import TOY_SOURCE_PREFIX
    from jsd.toyworld.build import Plan, publish

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "spiece.model").write_bytes(b"piece model")
    (shared / "NOTICE.md").write_text("rinna, Apache-2.0", encoding="utf-8")
    trained = tmp_path / "work" / "stage2"
    (trained / "tokenizer").mkdir(parents=True)
    (trained / "tokenizer" / "spiece.model").write_bytes(b"piece model")
    (trained / "unet").mkdir()
    (trained / "unet" / "config.json").write_text("{}", encoding="utf-8")
    dest = tmp_path / "toy" / "weights"
    (dest / "old").mkdir(parents=True)
    publish(trained, dest, shared / "spiece.model", Plan())
    assert (dest / "tokenizer" / "NOTICE.md").read_text(encoding="utf-8") == "rinna, Apache-2.0"
    assert not (dest / "old").exists() and sorted(p.name for p in dest.parent.iterdir()) == ["weights"]
    manifest = verify_manifest(dest)
    assert manifest["source"].startswith(TOY_SOURCE_PREFIX) and "not rinna's" in manifest["source"]
    assert "tokenizer/NOTICE.md" in manifest["files"]
    assert not (trained / "tokenizer" / "NOTICE.md").exists()  # the stage's own output is left as it was


# ------------------------------------------------------------------------------------------ the build's recipe
def quiet(_message: str) -> None:
    pass


def test_the_toy_schedule_is_sds_twice_as_noisy_and_every_served_sampler_starts_from_pure_noise():
    """With SD's schedule a big shape is still visible at the last timestep, and from pure noise the UNet drew blobs
    wherever the noise leaned (docs/toy-world.md). The toy's scheduler config carries the schedule itself, so
    train.py's DDPM and each sampler a user can pick (some have no `rescale_betas_zero_snr`) use the same one."""
    from diffusers import DDPMScheduler

    from jsd.schedulers import SCHEDULERS, make_scheduler
    from jsd.toyworld.build import Plan, toy_scheduler

    config = toy_scheduler(Plan()).config
    training = DDPMScheduler.from_config(config)  # as jsd.training.models builds train.py's noise
    assert training.config.prediction_type == "v_prediction" and float(training.alphas_cumprod[-1]) < 1e-7
    sd = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    snr = lambda alpha_bar: alpha_bar / (1 - alpha_bar)  # noqa: E731
    assert 3.5 < float(snr(sd[300]) / snr(training.alphas_cumprod[300])) < 4.5  # SNR ÷ 4 where it is not rescaled
    for name in SCHEDULERS:
        sampler = make_scheduler(name, config)
        sampler.set_timesteps(4)
        assert int(sampler.timesteps[0]) >= 998, name  # trailing: the first step is the last training timestep
        assert float(sampler.alphas_cumprod[-1]) < 1e-7, name


def test_the_toy_schedule_samples_finite_latents_with_every_served_sampler(tiny_checkpoint):
    """The last alpha-bar is tiny, not 0: at 0 the sigma-based samplers (Euler, LMS, Heun) start from infinity."""
    import torch

    from jsd.schedulers import SCHEDULERS, make_scheduler, scheduler_call_kwargs
    from jsd.serving import load_pipeline
    from jsd.toyworld.build import Plan, toy_scheduler

    pipe = load_pipeline(tiny_checkpoint, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    config = toy_scheduler(Plan()).config
    for name in SCHEDULERS:
        pipe.scheduler = make_scheduler(name, config)
        latents = pipe(
            "赤い丸", num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0),
            **scheduler_call_kwargs(name),
        ).images  # fmt: skip
        assert torch.isfinite(latents).all() and float(latents.abs().max()) < 100, name


def test_the_served_vae_downsamples_by_8_and_learns_the_teachers_averaged_latents(tmp_path):
    """The 8× VAE is distilled from the 4× one: its latents are the teacher's averaged over 2×2 (the UNet learnt
    where to put the shapes on those, not on an 8× VAE trained directly: docs/toy-world.md)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from jsd.toyworld.build import Plan, distill_vae8, nearly_deterministic, train_vae, vae8_config

    folder = world.write_image_folder(tmp_path / "data", list(world.examples(16, seed=0)))
    plan = Plan(vae_steps=4, vae_batch_size=4, vae8_steps=30)
    teacher = train_vae(folder, plan, [], progress=quiet)
    log = []
    student = distill_vae8(folder, teacher, plan, log, progress=quiet)
    torch.manual_seed(plan.seed)
    untrained = nearly_deterministic(AutoencoderKL(**vae8_config()))
    pictures = torch.stack([torch.from_numpy(np.array(e.image)) for e in world.examples(8, seed=3)])
    pictures = pictures.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        target = torch.nn.functional.avg_pool2d(teacher.encode(pictures).latent_dist.mean, 2)
        learnt = student.encode(pictures).latent_dist.mean
        start = untrained.encode(pictures).latent_dist.mean
    assert tuple(learnt.shape[-2:]) == (16, 16)  # 128 px pictures: the UNet's 16×16 down to 2×2
    error = lambda latents: float(((latents - target) ** 2).mean() / target.var())  # noqa: E731
    assert error(learnt) < 0.5 * error(start)
    assert [e["stage"] for e in log] == ["vae8"] * 30 and np.mean([e["loss"] for e in log[-5:]]) < log[0]["loss"]
    with torch.no_grad():  # unit-variance latents, as SD v1's scaling_factor gives
        spread = float((student.encode(pictures).latent_dist.mean * student.config.scaling_factor).std())
    assert 0.6 < spread < 1.6


def test_a_build_stopped_after_its_vaes_goes_on_without_training_them_again(tmp_path, monkeypatch):
    """Nothing finished is trained twice: a rerun with the same plan loads the VAEs; another plan starts over."""
    from jsd.toyworld import build as toy_build

    plan = toy_build.Plan(num_images=8, vae_steps=2, vae_batch_size=2, vae8_steps=2)
    work, dest, tokenizer = tmp_path / "work", tmp_path / "weights", tmp_path / "unused.model"
    first = toy_build.build(REPO, work, dest, tokenizer, plan, stop_after="vae8", progress=quiet)
    assert [e["stage"] for e in first["steps"]] == ["vae", "vae", "vae8", "vae8"]
    assert set(first["vae_round_trip"]) == {"vae", "vae8"} and (work / "vae8" / "config.json").is_file()

    trained = []
    real_train, real_distill = toy_build.train_vae, toy_build.distill_vae8
    monkeypatch.setattr(toy_build, "train_vae", lambda *a, **k: trained.append("vae") or real_train(*a, **k))
    monkeypatch.setattr(toy_build, "distill_vae8", lambda *a, **k: trained.append("vae8") or real_distill(*a, **k))
    messages = []
    again = toy_build.build(REPO, work, dest, tokenizer, plan, stop_after="vae8", progress=messages.append)
    assert trained == [] and again["steps"] == first["steps"]
    assert any("vae8: finished earlier" in m for m in messages), messages

    other = toy_build.Plan(num_images=8, vae_steps=2, vae_batch_size=2, vae8_steps=3)
    toy_build.build(REPO, work, dest, tokenizer, other, stop_after="vae8", progress=quiet)
    assert trained == ["vae", "vae8"]


FAKE_TRAIN = """
import pathlib, sys, time
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
run = out.with_name(out.name + "-run")
with (out.parent / "calls.txt").open("a") as calls:
    calls.write(" ".join(args) + "\\n")
if not (run / "checkpoint-3").exists():  # the first run is cut off after its first checkpoint
    (run / "checkpoint-3").mkdir(parents=True)
    time.sleep(0.3)
    sys.exit(1)
out.mkdir()
"""


def test_a_stage_cut_off_goes_on_from_its_last_checkpoint_and_counts_its_time(tmp_path):
    """A stage of an hour-long build that is cut off resumes (train.py --resume_from_checkpoint latest)."""
    import subprocess

    from jsd.toyworld.build import Plan, Progress, _run_stage

    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN, encoding="utf-8")
    work, plan = tmp_path / "work", Plan()
    work.mkdir()
    done = Progress(work, plan)
    name, config, steps, lr, extra = plan.stages[0]
    data = {"folder": work / "data", "shards": []}
    stage = (REPO, work, name, config, steps, lr, extra, work / "start", data, plan, script, done, quiet)
    with pytest.raises(subprocess.CalledProcessError):
        _run_stage(*stage)
    resumed = Progress(work, plan)  # the build's next run reads what the first one left
    earlier = resumed.done[f"{name} (cut off)"]["seconds"]
    _run_stage(*stage[:-2], resumed, quiet)
    first, second = (work / "calls.txt").read_text(encoding="utf-8").splitlines()
    assert "--resume_from_checkpoint" not in first and "--resume_from_checkpoint latest" in second
    assert f"--checkpointing_steps {plan.checkpointing_steps}" in first and "--checkpoints_total_limit 1" in first
    assert f"{name} (cut off)" not in resumed.done and resumed.done[name]["seconds"] >= earlier > 0
    assert "--resume_from_checkpoint" not in resumed.done[name]["command"]  # the log shows the plan's command
