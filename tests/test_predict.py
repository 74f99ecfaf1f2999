"""jsd.serving and predict.py without the server: seeds, NSFW, schedulers, validation, OOM, metadata."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image
from repofiles import REPO, load_repo_module

from jsd import optimize, serving
from jsd.manifest import WeightsVerificationError
from jsd.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler, scheduler_names
from jsd.serving import GenerationRequest, InputError, NSFWError
from jsd.tiny import set_nsfw_flagging

FAST = {"width": 128, "height": 128, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def generator(tiny_checkpoint):
    return serving.ImageGenerator(serving.load_pipeline(tiny_checkpoint, device="cpu"), model_revision="tiny-seed0")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_each_image_is_reproduced_alone_from_its_own_seed(generator):
    batch = generator.generate(GenerationRequest(**FAST, num_outputs=2, seed=40))
    alone = generator.generate(GenerationRequest(**FAST, num_outputs=1, seed=41))

    assert [item.seed for item in batch.images] == [40, 41]
    # Same noise and the same denoising; batching may change float rounding only.
    assert np.abs(pixels(batch.images[1].image) - pixels(alone.images[0].image)).max() <= 2
    assert np.abs(pixels(batch.images[0].image) - pixels(batch.images[1].image)).mean() > 5


def test_missing_seed_draws_a_random_63_bit_seed(generator):
    seeds = {GenerationRequest(**FAST).validate().seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_default_scheduler_is_dpm_solver_pp_2m_and_every_call_gets_a_new_one(generator, monkeypatch):
    built = []
    original = serving.make_scheduler
    monkeypatch.setattr(serving, "make_scheduler", lambda *a: built.append(original(*a)) or built[-1])
    loaded_config = dict(generator.pipeline.scheduler.config)

    generator.generate(GenerationRequest(**FAST, seed=1))
    generator.generate(GenerationRequest(**FAST, seed=1))

    assert len(built) == 2 and built[0] is not built[1]
    assert isinstance(built[0], DPMSolverMultistepScheduler)
    assert built[0].config.algorithm_type == "dpmsolver++" and built[0].config.solver_order == 2
    assert generator.pipeline.scheduler not in built
    assert dict(generator.pipeline.scheduler.config) == loaded_config


def test_each_request_steps_a_scheduler_object_of_its_own(generator, monkeypatch):
    # Which scheduler *object* runs the denoising steps: a pipeline that kept (or shared) one would step
    # the same object twice, which images cannot show (diffusers resets timesteps in set_timesteps).
    stepped = []
    for cls in {spec.cls for spec in SCHEDULERS.values()} | {type(generator.pipeline.scheduler)}:
        real_step = cls.step
        monkeypatch.setattr(
            cls,
            "step",
            lambda self, *args, _real=real_step, **kwargs: stepped.append(self) or _real(self, *args, **kwargs),
        )
    used = []
    for name in (DEFAULT_SCHEDULER, DEFAULT_SCHEDULER, "PNDM"):
        stepped.clear()
        generator.generate(GenerationRequest(**FAST, seed=1, scheduler=name))
        assert stepped and all(s is stepped[0] for s in stepped), name
        assert type(stepped[0]) is SCHEDULERS[name].cls, name
        used.append(stepped[0])

    assert len({id(s) for s in used}) == 3  # kept alive in `used`, so ids are not reused
    assert all(s is not generator.pipeline.scheduler for s in used)


def test_no_scheduler_state_leaks_between_requests(generator):
    request = GenerationRequest(**FAST, seed=3, scheduler="Euler ancestral")
    first = generator.generate(request)
    generator.generate(GenerationRequest(**FAST, seed=4, scheduler="PNDM"))
    again = generator.generate(request)

    assert first.images[0].image.tobytes() == again.images[0].image.tobytes()


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_generates(generator, name):
    result = generator.generate(GenerationRequest(**FAST, seed=2, scheduler=name))
    assert result.images[0].image.size == (128, 128)
    assert result.images[0].metadata["scheduler"] == name


def test_schedulers_keep_the_checkpoint_betas(generator):
    scheduler = make_scheduler("Euler", generator.pipeline.scheduler.config)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)
    assert scheduler.config.steps_offset == 1


@pytest.fixture
def flag_second_image(generator, monkeypatch):
    """The real safety checker, with only the second image of each batch flagged."""
    checker = generator.pipeline.safety_checker
    real_forward = checker.forward

    def forward(clip_input, images):
        images, _ = real_forward(clip_input, images)
        return images, [i == 1 for i in range(len(images))]

    monkeypatch.setattr(checker, "forward", forward)


def test_a_flagged_image_is_dropped_and_the_others_returned(generator, flag_second_image):
    result = generator.generate(GenerationRequest(**FAST, num_outputs=3, seed=10))

    assert [item.seed for item in result.images] == [10, 12]
    assert [item.index for item in result.images] == [0, 2]
    assert result.flagged_seeds == [11]


@pytest.fixture
def flag_everything(generator):
    set_nsfw_flagging(generator.pipeline.safety_checker, "always")
    yield
    set_nsfw_flagging(generator.pipeline.safety_checker, "never")


def test_the_request_fails_only_when_every_image_is_flagged(generator, flag_everything):
    with pytest.raises(NSFWError, match=r"All 2 image\(s\) were flagged.*seeds 5, 6"):
        generator.generate(GenerationRequest(**FAST, num_outputs=2, seed=5))


def test_disable_safety_checker_returns_flagged_images_for_that_request_only(generator, flag_everything):
    result = generator.generate(GenerationRequest(**FAST, num_outputs=2, seed=5, disable_safety_checker=True))
    assert len(result.images) == 2 and result.flagged_seeds == []
    with pytest.raises(NSFWError):
        generator.generate(GenerationRequest(**FAST, seed=5))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"width": 500}, "`width` must be a multiple of 64 between 128 and 1024, got 500"),
        ({"height": 2048}, "`height` must be between 128 and 1024, got 2048"),
        ({"width": "512"}, "`width` must be an integer between 128 and 1024, got '512'"),
        ({"num_outputs": 0}, "`num_outputs` must be between 1 and 4, got 0"),
        ({"width": 1024, "height": 1024, "num_outputs": 3}, "1024×1024×3 = 3,145,728 pixels exceeds the budget"),
        ({"num_inference_steps": 101}, "`num_inference_steps` must be between 1 and 100, got 101"),
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a number between 1.0 and 20.0, got nan"),
        ({"scheduler": "euler"}, "`scheduler` must be one of 'DPM-Solver++ 2M'"),
        ({"seed": 2**63}, f"`seed` must be between 0 and {2**63 - 1}, got {2**63}"),
        ({"seed": True}, "`seed` must be an integer"),
        ({"prompt": None}, "`prompt` must be text, got NoneType"),
        ({"prompt": "あ" * 2001}, "`prompt` has 2,001 characters; at most 2,000 are allowed"),
        ({"negative_prompt": "x" * 10**6}, "`negative_prompt` has 1,000,000 characters; at most 2,000"),
        ({"prompt": "猫\x01犬"}, "`prompt` contains the control character U+0001 at position 1"),
        ({"negative_prompt": "a\x0cb"}, "`negative_prompt` contains the control character U+000C at position 1"),
        ({"prompt": "猫\ud800"}, "`prompt` contains an unpaired surrogate U+D800 at position 1"),
        ({"prompt_strength": -0.1}, "`prompt_strength` must be between 0.0 and 1.0, got -0.1"),
        ({"output_format": "gif"}, "`output_format` must be one of webp, png, jpg; got 'gif'"),
        ({"output_quality": 0}, "`output_quality` must be between 1 and 100, got 0"),
        ({"mask": "mask.png"}, "`mask` was given without `image`"),
    ],
)
def test_invalid_inputs_are_rejected_before_any_model_work(generator, monkeypatch, changes, needle):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the UNet ran for an invalid request")

    monkeypatch.setattr(generator.pipeline.unet, "forward", no_model_work)
    with pytest.raises(InputError) as err:
        generator.generate(GenerationRequest(**FAST | changes))
    assert needle in str(err.value)


def test_prompt_limits_are_checked_before_tokenizing(generator, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the prompt was tokenized before it was checked")

    monkeypatch.setattr(serving, "tokenize_prompt", no_tokenizing)
    for text in ("あ" * (serving.MAX_PROMPT_CHARS + 1), "猫\x7f"):
        with pytest.raises(InputError, match="`prompt`"):
            generator.generate(GenerationRequest(**FAST, prompt=text))
    # At the limit, with tab and newline, the prompt is accepted.
    GenerationRequest(**FAST, prompt="あ\tい\n" * (serving.MAX_PROMPT_CHARS // 4)).validate()


def test_xmp_metadata_drops_characters_xml_cannot_hold(tmp_path):
    meta = {"prompt": "猫\x01\x0b犬\ud800\r\n\t「」", "seed": "1"}
    for suffix in (".webp", ".jpg"):
        path = serving.save_image(Image.new("RGB", (8, 8)), tmp_path / f"x{suffix}", metadata=meta)
        assert serving.read_metadata(path) == {"prompt": "猫犬\r\n\t「」", "seed": "1"}


def test_unreadable_image_and_mask_files_name_the_input(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    with pytest.raises(InputError, match="`image` could not be read as an image"):
        GenerationRequest(**FAST, image=tmp_path / "broken.png").validate()
    with pytest.raises(InputError, match="`mask` could not be read as an image"):
        GenerationRequest(**FAST, image=tmp_path / "ok.png", mask=tmp_path / "missing.png").validate()
    with pytest.raises(InputError, match=r"`prompt_strength` 0\.2 × `num_inference_steps` 2"):
        GenerationRequest(**FAST, image=tmp_path / "ok.png", prompt_strength=0.2).validate()


def test_img2img_and_inpaint_return_the_requested_size(generator, tmp_path):
    Image.new("RGB", (300, 180), (30, 120, 200)).save(tmp_path / "in.jpg")
    mask = Image.new("L", (300, 180), 0)
    mask.paste(255, (0, 0, 150, 180))

    img2img = generator.generate(GenerationRequest(**FAST | {"width": 192}, image=tmp_path / "in.jpg", seed=1))
    inpaint = generator.generate(GenerationRequest(**FAST, image=tmp_path / "in.jpg", mask=mask, seed=1))

    assert img2img.images[0].image.size == (192, 128)
    assert img2img.images[0].metadata["mode"] == "img2img"
    assert inpaint.images[0].image.size == (128, 128)
    assert inpaint.images[0].metadata["mode"] == "inpaint"


def test_only_out_of_memory_errors_count_as_out_of_memory():
    assert serving.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB"))
    assert serving.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not serving.is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))


def test_other_runtime_errors_are_not_disguised_as_out_of_memory(generator, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(serving.JapaneseStableDiffusionPipeline, "__call__", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        generator.generate(GenerationRequest(**FAST, seed=1))


def test_free_accelerator_memory_is_a_no_op_on_cpu_and_empties_the_cuda_cache_otherwise(monkeypatch):
    serving.free_accelerator_memory()  # the real function, here without CUDA: must not fail
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    serving.free_accelerator_memory()
    assert emptied == [True]


def test_cuda_out_of_memory_frees_memory_and_the_next_request_works(generator, monkeypatch):
    real_call = serving.JapaneseStableDiffusionPipeline.__call__
    emptied, activations = [], []

    def call_once_out_of_memory(self, *args, **kwargs):
        if not activations:
            held = torch.empty(1024, 1024)  # what the failed denoising step leaves in its frames
            activations.append(weakref.ref(held))
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host, for the cleanup
            monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(activations[0]() is None))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(serving.JapaneseStableDiffusionPipeline, "__call__", call_once_out_of_memory)
    with pytest.raises(serving.GenerationError, match="CUDA ran out of memory generating 2 image") as failed:
        generator.generate(GenerationRequest(**FAST, num_outputs=2, seed=1))
    monkeypatch.undo()  # torch.cuda as it is again

    # The real free_accelerator_memory ran once, after the failed call's tensors were released (the
    # cache can only give back what nothing holds), and the error keeps no traceback that holds them.
    assert emptied == [True]
    assert failed.value.__cause__ is None and failed.value.__context__ is None
    assert activations[0]() is None
    assert len(generator.generate(GenerationRequest(**FAST, seed=1)).images) == 1


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_saved_files_carry_prompt_seed_steps_scheduler_guidance_and_revision(generator, tmp_path, fmt):
    request = GenerationRequest(
        **FAST, prompt="夜の東京 <浮世絵> & 桜", negative_prompt="ぼやけた", seed=77, output_format=fmt
    )
    paths = generator.generate(request).save(tmp_path)

    assert [p.name for p in paths] == [f"out-0.{fmt}"]
    with Image.open(paths[0]) as image:
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}[fmt]
    meta = serving.read_metadata(paths[0])
    assert meta["prompt"] == "夜の東京 <浮世絵> & 桜" and meta["negative_prompt"] == "ぼやけた"
    assert meta["seed"] == "77" and meta["num_inference_steps"] == "2"
    assert meta["scheduler"] == DEFAULT_SCHEDULER and meta["guidance_scale"] == "7.5"
    assert meta["model_revision"] == "tiny-seed0"


def test_webp_metadata_round_trips_japanese_newlines_and_quotes(generator, tmp_path):
    prompt = "夜の東京、\"雨\" と '傘'\n浮世絵\t（油絵：1.2） & <b>"
    negative = 'ぼやけた\n低品質 "文字"'
    request = GenerationRequest(**FAST, prompt=prompt, negative_prompt=negative, seed=8, output_format="webp")
    (path,) = generator.generate(request).save(tmp_path)

    meta = serving.read_metadata(path)
    assert meta["prompt"] == prompt and meta["negative_prompt"] == negative


# ---- predict.py itself, as Cog calls it (setup once, then run) ----------------------------------------


def load_predict_module():
    return load_repo_module("predict.py")


def test_predictor_setup_and_run_write_image_files(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("JSD_WEIGHTS", str(tiny_checkpoint))
    predictor = load_predict_module().Predictor()
    predictor.setup()

    paths = predictor.run(**FAST, **_run_defaults(), num_outputs=2, seed=21, output_format="png")

    assert [p.suffix for p in paths] == [".png", ".png"]
    assert [serving.read_metadata(p)["seed"] for p in paths] == ["21", "22"]
    assert Image.open(paths[1]).size == (128, 128)


def test_predictor_records_the_metrics_of_its_request(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("JSD_WEIGHTS", str(tiny_checkpoint))
    predictor = load_predict_module().Predictor()
    predictor.setup()
    checker = predictor.generator.pipeline.safety_checker
    real_forward = checker.forward
    monkeypatch.setattr(
        checker, "forward", lambda clip_input, images: (real_forward(clip_input, images)[0], [False, True, False])
    )
    recorded = {}
    monkeypatch.setattr(predictor, "record_metric", lambda key, value, mode="replace": recorded.update({key: value}))

    paths = predictor.run(**FAST, **_run_defaults() | {"prompt": "猫"}, num_outputs=3, seed=10, output_format="png")

    assert len(paths) == 2
    assert recorded["seeds"] == [10, 11, 12] and recorded["nsfw_filtered"] == 1
    assert (recorded["prompt_chunks"], recorded["prompt_truncated_tokens"]) == (1, 0)
    assert recorded["prompt_tokens"] == len(predictor.generator.pipeline.tokenizer.sp_model.encode("猫"))
    assert 0 < recorded["inference_seconds"] < 60


def test_each_run_leaves_only_its_own_files(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("JSD_WEIGHTS", str(tiny_checkpoint))
    predictor = load_predict_module().Predictor()
    predictor.setup()

    first = predictor.run(**FAST, **_run_defaults(), num_outputs=2, seed=1, output_format="png")
    second = predictor.run(**FAST, **_run_defaults(), num_outputs=1, seed=2, output_format="webp")

    assert not any(p.exists() for p in first)  # removed when the next prediction started
    assert sorted(second[0].parent.iterdir()) == second
    assert first[0].parent == second[0].parent  # one folder for the server's lifetime, not one per prediction
    assert serving.read_metadata(second[0])["seed"] == "2"


def test_predictor_schema_limits_the_prompt_length(monkeypatch):
    from cog import _inspector

    monkeypatch.chdir(REPO)
    info = _inspector.create_predictor("predict", "Predictor")  # what the schema (and coglet's 422s) come from

    for name in ("prompt", "negative_prompt"):
        assert info.inputs[name].max_length == serving.MAX_PROMPT_CHARS
        assert f"at most {serving.MAX_PROMPT_CHARS:,} characters" in info.inputs[name].description


def test_predictor_setup_fails_on_a_damaged_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    weights = shutil.copytree(tiny_checkpoint, tmp_path / "weights")
    # One flipped bit in the last weight's bytes: the file still loads (only the manifest can tell).
    unet = weights / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0x01
    unet.write_bytes(bytes(data))
    serving.load_pipeline(weights, device="cpu")
    monkeypatch.setenv("JSD_WEIGHTS", str(weights))

    with pytest.raises(WeightsVerificationError, match=r"unet/diffusion_pytorch_model\.safetensors does not match"):
        load_predict_module().Predictor().setup()


def test_predictor_setup_applies_the_fast_path(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("JSD_WEIGHTS", str(tiny_checkpoint))
    monkeypatch.delenv("JSD_TORCH_COMPILE", raising=False)
    monkeypatch.delenv("JSD_WARMUP", raising=False)
    real_load = serving.load_pipeline

    def load_with_classic_attention(*args, **kwargs):
        # diffusers and transformers already default to SDPA on torch 2: start from the classic attention (as
        # an older library or a checkpoint's config may), so that only the fast path can make it SDPA
        pipe = real_load(*args, **kwargs)
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
        pipe.text_encoder.set_attn_implementation("eager")
        return pipe

    monkeypatch.setattr(serving, "load_pipeline", load_with_classic_attention)
    predictor = load_predict_module().Predictor()
    predictor.setup()

    pipe = predictor.generator.pipeline
    # diffusers' defaults are neither: tiling off, and tiles of the VAE's own 512 px when on.
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert pipe.vae.tile_sample_min_size == optimize.VAE_TILE_SIZE != pipe.vae.config.sample_size
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.vae.attn_processors.values())
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def _run_defaults() -> dict:
    """run()'s declared defaults, as Cog would fill them in (FieldInfo → value)."""
    import inspect

    signature = inspect.signature(load_predict_module().Predictor.run)
    values = {name: p.default.default for name, p in signature.parameters.items() if name != "self"}
    return {k: v for k, v in values.items() if k not in {*FAST, "num_outputs", "seed", "output_format"}}


def test_cog_image_installs_exactly_the_tested_pins():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli, the same parser
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tested = {*project["dependencies"], *project["optional-dependencies"]["serve"]}
    tested = {pin for pin in tested if not pin.startswith("cog==")}  # cog build brings its own SDK
    lines = (REPO / "requirements.txt").read_text().splitlines()
    image = {line.strip() for line in lines if line.strip() and not line.startswith("#")}

    assert image == tested
    assert 'run: "predict.py:Predictor"' in (REPO / "cog.yaml").read_text()


def test_cog_loads_and_inspects_the_predictor_without_deprecation_warnings(monkeypatch):
    import warnings

    from cog import _inspector
    from cog.predictor import load_predictor_from_ref

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = load_predictor_from_ref("predict.py:Predictor")  # what coglet's worker does
        info = _inspector.create_predictor("predict", "Predictor")  # what the schema is built from
    # cog's own: "Predictor is deprecated; use Runner …", "….predict() is deprecated; use run() …", "BasePredictor …"
    messages = [str(w.message) for w in caught]
    cog_warnings = [m for m in messages if "deprecated" in m and ("Runner" in m or "run()" in m)]

    assert cog_warnings == []
    assert type(predictor).__name__ == "Predictor" and "prompt" in info.inputs
    assert info.output.json_type() == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}


def test_the_same_request_draws_the_same_image_in_cog_the_library_and_the_cli(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """Defaults only (beyond size, steps, seed and format): a weighted prompt is weighted in all three."""
    from jsd.cli import main

    prompt, seed = "(猫:1.8) と犬 油絵", 5
    monkeypatch.setenv("JSD_WEIGHTS", str(tiny_checkpoint))
    predictor = load_predict_module().Predictor()
    predictor.setup()
    inputs = _run_defaults() | FAST | {"prompt": prompt}
    cog = pixels(Image.open(predictor.run(**inputs, num_outputs=1, seed=seed, output_format="png")[0]))
    request = GenerationRequest(prompt=prompt, **FAST, seed=seed, output_format="png")
    library = pixels(predictor.generator.generate(request).images[0].image)
    size = ["--width", "128", "--height", "128", "--steps", "2", "--seed", str(seed)]
    main(["generate", prompt, "--weights", str(tiny_checkpoint), *size, "-o", str(tmp_path / "cli.png")])
    cli = pixels(Image.open(tmp_path / "cli.png"))
    plain = pixels(predictor.generator.generate(dataclasses.replace(request, prompt_weighting=False)).images[0].image)

    assert np.array_equal(cog, library) and np.array_equal(cli, library)
    assert np.abs(library - plain).max() > 0  # the brackets are read as a weight, not as text


def test_an_output_folder_is_removed_at_exit_or_by_the_next_server_after_a_crash(tmp_path, monkeypatch):
    from jsd import scratch

    monkeypatch.setattr(scratch.tempfile, "gettempdir", lambda: str(tmp_path))
    code = "import os; from jsd import scratch; print(scratch.process_folder('jsd-outputs-'), flush=True)"

    def folder_of(extra: str = "") -> Path:
        done = subprocess.run(
            [sys.executable, "-c", code + extra], capture_output=True, text=True, timeout=120, env=_tmpdir(tmp_path)
        )
        return Path(done.stdout.strip())

    assert not folder_of().exists()  # removed at exit (atexit)
    killed = folder_of("; os.kill(os.getpid(), 9)")
    assert killed.is_dir()  # SIGKILL: no exit handler ran

    mine = scratch.process_folder("jsd-outputs-")  # the next server (here: this process) sweeps it

    assert not killed.exists()
    assert mine.is_dir() and mine.name.startswith(f"jsd-outputs-{os.getpid()}-")
    other = tmp_path / "jsd-outputs-1-abc"  # pid 1 runs: a folder of a live process is kept
    other.mkdir()
    scratch.process_folder("jsd-outputs-")
    assert other.is_dir()


def _tmpdir(folder) -> dict:
    return dict(os.environ, TMPDIR=str(folder))
