"""Fast mode and several LoRAs per request, seen in the pixels: the real Predictor and CLI against diffusers' own
pipeline with the same components, scheduler and adapters (``load_lora_weights(adapter_name=...)`` +
``set_adapters``), on the tiny checkpoint with a seeded fast-mode LoRA (``jsd.tiny.write_tiny_fast_lora``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, TCDScheduler
from peft import LoraConfig
from reference import read_pixels
from repofiles import load_repo_module
from safetensors import safe_open
from safetensors.torch import save_file
from test_download import SHA, FakeHub, download_weights
from test_inputs import lora_file, run_defaults  # noqa: F401 (the style LoRA fixture: UNet and text encoder)

from jsd.cli import main
from jsd.fast_mode import (
    FAST_MODES,
    LORA_FILE,
    SETTINGS_FILE,
    FastModeError,
    install_fast_lora,
    load_fast_loras,
    read_settings,
)
from jsd.lora_weights import UNET_TARGET_MODULES
from jsd.manifest import verify_manifest
from jsd.serving import InputError, read_metadata
from jsd.tiny import TINY_FAST_MODE, write_tiny_fast_lora

PROMPT = "夜の東京 油絵"
FAST = {"prompt": PROMPT, "width": 128, "height": 192, "num_outputs": 1, "seed": 5, "prompt_weighting": False}
TOLERANCE = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weights(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a seeded LoRA installed as fast mode ``lcm`` (as ``make demo`` writes it)."""
    folder = tmp_path_factory.mktemp("fast") / "weights"
    shutil.copytree(tiny_checkpoint, folder)
    write_tiny_fast_lora(folder, "lcm")
    return folder


@pytest.fixture(scope="module")
def predict_module():
    return load_repo_module("predict.py")


@pytest.fixture(scope="module")
def predictor(predict_module, weights):
    with mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(weights)}):
        predictor = predict_module.Predictor()
        predictor.setup()
    return predictor


def predicted(predictor, predict_module, **inputs) -> np.ndarray:
    (path,) = predictor.run(**run_defaults(predict_module) | {"output_format": "png"} | inputs)
    return read_pixels(path)


def diffusers_image(components, scheduler, *, loras=(), eta: float | None = None, **kwargs) -> np.ndarray:
    """diffusers' StableDiffusionPipeline with ``loras`` ((file, scale) pairs) as named adapters via set_adapters."""
    pipe = StableDiffusionPipeline(**dict(components) | {"safety_checker": None, "scheduler": scheduler})
    names = []
    for index, (path, _) in enumerate(loras):
        names.append(f"adapter{index}")
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    call = {"prompt": FAST["prompt"], "width": FAST["width"], "height": FAST["height"]} | kwargs
    if eta is not None:
        call["eta"] = eta
    try:
        image = pipe(**call, generator=[torch.Generator("cpu").manual_seed(FAST["seed"])]).images[0]
    finally:
        pipe.unload_lora_weights()
    return np.asarray(image).astype(np.int16)


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= TOLERANCE, f"differs by up to {np.abs(ours - theirs).max()} levels"


def config(predictor) -> dict:
    return predictor.generator.pipeline.scheduler.config


# ------------------------------------------------------------------------------------------ prediction
def test_fast_mode_is_the_lora_with_its_scheduler_steps_and_no_guidance(predictor, predict_module, weights):
    components = predictor.generator.pipeline.components
    fast = predicted(predictor, predict_module, **FAST, fast_mode="lcm")  # steps, guidance, scheduler: defaults
    theirs = diffusers_image(
        components,
        LCMScheduler.from_config(config(predictor)),
        loras=[(weights / "fast" / "lcm" / LORA_FILE, 1.0)],
        num_inference_steps=4,
        guidance_scale=1.0,
    )
    assert_same(fast, theirs)
    plain_4 = predicted(predictor, predict_module, **FAST, num_inference_steps=4, guidance_scale=1.0, scheduler="LCM")
    assert np.abs(fast - plain_4).mean() > 3  # the LoRA really is loaded


def test_settings_given_with_fast_mode_are_used_within_its_limits(predictor, predict_module, weights):
    components = predictor.generator.pipeline.components
    ours = predicted(
        predictor, predict_module, **FAST, fast_mode="lcm", num_inference_steps=6, guidance_scale=1.5, scheduler="TCD"
    )
    theirs = diffusers_image(
        components,
        TCDScheduler.from_config(config(predictor)),
        loras=[(weights / "fast" / "lcm" / LORA_FILE, 1.0)],
        num_inference_steps=6,
        guidance_scale=1.5,
        eta=0.3,
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ({"num_inference_steps": 30}, "`num_inference_steps` must be at most 8 with `fast_mode` 'lcm'"),
        ({"guidance_scale": 7.0}, "`guidance_scale` must be at most 2 with `fast_mode` 'lcm'"),
        ({"fast_mode": "tcd"}, "`fast_mode` 'tcd' is not installed in this model's weights (installed: 'lcm')"),
    ],
)
def test_what_a_fast_mode_was_not_made_for_is_refused_naming_the_input(predictor, predict_module, inputs, needle):
    with pytest.raises(InputError) as err:
        predicted(predictor, predict_module, **FAST | {"fast_mode": "lcm"} | inputs)
    assert needle in str(err.value)


def test_lcm_and_tcd_take_at_most_50_steps_without_fast_mode_too(predictor, predict_module):
    with pytest.raises(InputError, match=r"`num_inference_steps` must be at most 50 with `scheduler` 'LCM'"):
        predicted(predictor, predict_module, **FAST, scheduler="LCM", num_inference_steps=60)


def test_fast_mode_with_a_style_lora_applies_both_each_at_its_scale_then_the_base_model_is_back(
    predictor,
    predict_module,
    weights,
    lora_file,  # noqa: F811
):
    base = predicted(predictor, predict_module, **FAST, num_inference_steps=3)
    both = predicted(predictor, predict_module, **FAST, fast_mode="lcm", lora_weights=str(lora_file), lora_scale=0.6)
    assert_same(both, lcm_with_style_lora(predictor, weights, lora_file))
    fast_only = predicted(predictor, predict_module, **FAST, fast_mode="lcm")
    assert np.abs(both - fast_only).mean() > 3  # the style LoRA is there too
    assert np.array_equal(predicted(predictor, predict_module, **FAST, num_inference_steps=3), base)  # unloaded


def lcm_with_style_lora(predictor, weights: Path, style: Path) -> np.ndarray:
    """Plain diffusers on ``predictor``'s components: the LCM fast-mode LoRA at 1.0 and ``style`` at 0.6."""
    return diffusers_image(
        predictor.generator.pipeline.components,
        LCMScheduler.from_config(config(predictor)),
        loras=[(weights / "fast" / "lcm" / LORA_FILE, 1.0), (style, 0.6)],
        num_inference_steps=4,
        guidance_scale=1.0,
    )


def test_a_trained_versions_lora_goes_with_fast_mode(predict_module, weights, lora_file):  # noqa: F811
    with mock.patch.dict(os.environ, {"JSD_WEIGHTS": str(weights)}):
        version = predict_module.Predictor()
        version.setup(str(lora_file))  # COG_WEIGHTS
    ours = predicted(version, predict_module, **FAST, fast_mode="lcm", lora_scale=0.6)
    assert_same(ours, lcm_with_style_lora(version, weights, lora_file))


def test_tcd_samples_with_eta_0_3(predictor, predict_module):
    components = predictor.generator.pipeline.components
    ours = predicted(predictor, predict_module, **FAST, scheduler="TCD", num_inference_steps=3, guidance_scale=3.0)
    scheduler = TCDScheduler.from_config(config(predictor))
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0}
    assert_same(ours, diffusers_image(components, scheduler, eta=0.3, **kwargs))
    assert np.abs(ours - diffusers_image(components, scheduler, eta=0.0, **kwargs)).max() > TOLERANCE


def test_ddim_trailing_is_hyper_sds_sampler(predictor, predict_module):
    components = predictor.generator.pipeline.components
    ours = predicted(predictor, predict_module, **FAST, scheduler="DDIM trailing", num_inference_steps=2)
    scheduler = DDIMScheduler.from_config(config(predictor), timestep_spacing="trailing", clip_sample=False)
    assert_same(ours, diffusers_image(components, scheduler, num_inference_steps=2, guidance_scale=7.5))


def test_the_schema_offers_every_fast_mode_off_by_default(predict_module):
    defaults = run_defaults(predict_module)
    assert defaults["fast_mode"] == "off"
    assert FAST_MODES == ["off", "lcm", "tcd", "hyper-sd-4step", "jsd-lcm"]


# ------------------------------------------------------------------------------------------ weights
def lora_with_cross_attention(path: Path, width: int) -> Path:
    """A kohya-format LoRA whose cross-attention projections read ``width``-wide text features."""
    layers = {}
    for proj in ("to_k", "to_v"):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_{proj}"
        layers |= {
            f"{key}.lora_down.weight": torch.zeros(4, width),
            f"{key}.lora_up.weight": torch.zeros(320, 4),
            f"{key}.alpha": torch.tensor(4.0),
        }
    save_file(layers, path)
    return path


@pytest.mark.parametrize(("width", "family"), [(2048, "SDXL"), (1024, "SD 2.x"), (768, "SD 1.x")])
def test_a_lora_for_another_base_is_refused_by_name_when_installed_and_when_requested(
    predictor, predict_module, weights, tmp_path, width, family
):
    path = lora_with_cross_attention(tmp_path / "other.safetensors", width)
    with pytest.raises(FastModeError, match=rf"`--fast_mode tcd` .* was made for {family}"):
        install_fast_lora(path, weights, "tcd", source=str(path), revision="x")
    assert not (weights / "fast" / "tcd").exists()
    with pytest.raises(InputError, match=rf"`lora_weights` .* was made for {family}"):
        predicted(predictor, predict_module, **FAST, lora_weights=str(path))


def test_a_damaged_or_unknown_fast_mode_folder_fails_loading_by_name(weights, tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(weights, copy)
    lora = copy / "fast" / "lcm" / LORA_FILE
    lora.write_bytes(lora.read_bytes()[:-1] + b"\0")
    with pytest.raises(FastModeError, match=r"fast mode 'lcm' in .* failed verification"):
        load_fast_loras(copy)
    shutil.rmtree(copy / "fast" / "lcm")
    (copy / "fast" / "turbo").mkdir()
    with pytest.raises(FastModeError, match="'turbo' is not a fast mode"):
        load_fast_loras(copy)


def test_the_tiny_fast_lora_is_unet_only_with_peft_keys_and_its_own_manifest(weights):
    folder = weights / "fast" / "lcm"
    manifest = verify_manifest(folder)
    assert set(manifest["files"]) == {LORA_FILE, SETTINGS_FILE}
    settings = read_settings(folder)
    assert (settings.scheduler, settings.num_inference_steps, settings.guidance_scale) == ("LCM", 4, 1.0)
    assert json.loads((folder / SETTINGS_FILE).read_text())["license"]
    verify_manifest(weights)  # the main manifest leaves fast/ to its own


def test_cli_generate_fast_mode_records_what_it_ran(weights, tmp_path, capsys):
    out = tmp_path / "fast.png"
    size = ["--width", "128", "--height", "128", "--seed", "3"]
    main(["generate", PROMPT, "--weights", str(weights), "--fast_mode", "lcm", *size, "-o", str(out)])
    meta = read_metadata(out)
    assert (meta["fast_mode"], meta["num_inference_steps"], meta["guidance_scale"]) == ("lcm", "4", "1.0")
    assert meta["scheduler"] == "LCM" and len(meta["fast_mode_sha256"]) == 64
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--weights", str(weights), "--fast_mode", "tcd", "-o", str(tmp_path / "x.png")])
    assert "`fast_mode` 'tcd' is not installed" in capsys.readouterr().err


def lora_unet_only(weights: Path, folder: Path) -> Path:
    """A diffusers-format UNet-only LoRA as `jsd distill` writes it (peft keys)."""
    from diffusers import UNet2DConditionModel

    from jsd.lora_weights import LORA_WEIGHT_NAME, save_lora

    unet = UNet2DConditionModel.from_pretrained(weights / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(UNET_TARGET_MODULES)))
    save_lora(folder, unet)
    (folder / LORA_WEIGHT_NAME).rename(folder / LORA_FILE)
    return folder


# ------------------------------------------------------------------------------------------ installing
class CardHub:
    """huggingface_hub's model_info/snapshot_download for a LoRA repo: test_download.py's FakeHub, plus a card."""

    def __init__(self, repo: Path, cache: Path, license: str):
        self.hub, self.license = FakeHub(repo, cache), license

    def model_info(self, repo_id, *, revision=None, token=None):
        info = self.hub.model_info(repo_id, revision=revision, token=token)
        info.card_data = SimpleNamespace(license=self.license)
        return info


@pytest.fixture
def card_hub(monkeypatch, tmp_path, weights):
    repo = tmp_path / "hub"
    repo.mkdir()
    shutil.copyfile(weights / "fast" / "lcm" / LORA_FILE, repo / "TCD-SD15-LoRA.safetensors")
    (repo / "README.md").write_text("# TCD")
    hub = CardHub(repo, tmp_path / "cache", "apache-2.0")  # not the recipe's "mit": the card's is recorded
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", hub.model_info)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.hub.snapshot_download)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    return hub


def test_download_installs_a_public_lora_with_its_source_revision_and_license(card_hub, weights, tmp_path, capsys):
    dest = tmp_path / "weights"
    shutil.copytree(weights, dest)
    assert download_weights.main(["--dest", str(dest), "--fast_mode", "tcd"]) == 0
    (download,) = card_hub.hub.downloads
    assert download["allow_patterns"] == ["TCD-SD15-LoRA.safetensors"] and download["revision"] == SHA
    settings = read_settings(dest / "fast" / "tcd")
    assert (settings.source, settings.revision) == ("h1t/TCD-SD15-LoRA/TCD-SD15-LoRA.safetensors", SHA)
    assert (settings.license, settings.scheduler) == ("apache-2.0", "TCD")
    with safe_open(dest / "fast" / "tcd" / LORA_FILE, framework="pt") as f:  # converted to the served fp16
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert set(load_fast_loras(dest)) == {"lcm", "tcd"}
    assert "tcd: TCD, 4 steps, guidance 1; h1t/TCD-SD15-LoRA" in capsys.readouterr().out


def test_download_installs_a_local_distilled_lora_and_refuses_what_does_not_fit(weights, tmp_path, capsys):
    dest = tmp_path / "weights"
    shutil.copytree(weights, dest)
    distilled = lora_unet_only(weights, tmp_path / "distill")
    assert (
        download_weights.main(["--dest", str(dest), "--fast_mode", "jsd-lcm", "--fast_mode_file", str(distilled)]) == 0
    )
    assert read_settings(dest / "fast" / "jsd-lcm").source == str((distilled / LORA_FILE).resolve())
    assert "jsd-lcm" in load_fast_loras(dest)

    assert download_weights.main(["--dest", str(dest), "--fast_mode", "jsd-lcm"]) == 1
    assert "give --fast_mode_file" in capsys.readouterr().err
    sdxl = lora_with_cross_attention(tmp_path / "sdxl.safetensors", 2048)
    assert (
        download_weights.main(["--dest", str(dest), "--fast_mode", "hyper-sd-4step", "--fast_mode_file", str(sdxl)])
        == 1
    )
    assert "`--fast_mode hyper-sd-4step`" in (err := capsys.readouterr().err) and "made for SDXL" in err
    assert not (dest / "fast" / "hyper-sd-4step").exists()


def test_evaluate_compares_fast_mode_with_the_plain_settings_on_the_same_weights(
    weights, tiny_scorer, tmp_path, capsys
):
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    shutil.copytree(tiny_scorer, folder / "japanese_clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("赤い花の写真\n猫が寝ている\n", encoding="utf-8")
    size = ["--width", "128", "--height", "128", "--steps", "3"]
    out = tmp_path / "eval"
    main(["evaluate", "--weights", str(folder), "--prompts", str(prompts), "--output_dir", str(out), *size,
          "--fast_mode", "lcm", "--compare", str(folder)])  # fmt: skip
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [arm["label"] for arm in report["arms"]] == [f"{folder}, fast mode lcm", str(folder)]
    assert "difference_a_minus_b" in report
    main(["generate", "猫が寝ている", "--weights", str(folder), *size, "--seed", "1", "--fast_mode", "lcm",
          "--disable_safety_checker", "-o", str(tmp_path / "g.png")])  # fmt: skip
    fast, plain = (read_pixels(out / "images" / side / "002.png") for side in "AB")
    assert np.array_equal(fast, read_pixels(tmp_path / "g.png"))  # the prediction path, in fast mode
    assert np.abs(fast - plain).mean() > 3


def test_make_demo_gives_the_tiny_checkpoint_a_fast_mode_lora(tiny_checkpoint, tmp_path):
    demo = load_repo_module("scripts/demo.py")
    old = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, old)  # a tiny checkpoint written before fast mode existed
    assert demo.ensure_weights(old) == "tiny"
    assert set(load_fast_loras(old)) == {TINY_FAST_MODE} == {"lcm"}
