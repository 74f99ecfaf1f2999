"""``python -m jsd generate``: images on disk, the seed printed, clear errors before any model work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from jsd.cli import main
from jsd.serving import read_metadata


def generate(capsys, *args: str) -> str:
    main(["generate", *args])
    return capsys.readouterr().out


def test_generate_writes_images_and_prints_reproducible_seeds(tmp_path, capsys, tiny_checkpoint):
    common = [
        "サラリーマン 油絵",
        "--weights",
        str(tiny_checkpoint),
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "2",
    ]
    out = generate(capsys, *common, "--seed", "7", "--num_outputs", "2", "-o", str(tmp_path / "a.png"))
    assert "seed: 7" in out
    assert read_metadata(tmp_path / "a-1.png")["seed"] == "8"
    assert read_metadata(tmp_path / "a-1.png")["prompt_weighting"] == "True"  # as Cog's default
    first, second = Image.open(tmp_path / "a-0.png"), Image.open(tmp_path / "a-1.png")
    assert first.size == (128, 128)
    # image 1 of a batch is reproducible alone from its own seed (seed + 1); batched float maths may
    # round a few pixels differently by one level, never more
    generate(capsys, *common, "--seed", "8", "-o", str(tmp_path / "b.png"))
    alone = np.asarray(Image.open(tmp_path / "b.png"), dtype=int)
    assert np.abs(alone - np.asarray(second, dtype=int)).max() <= 1
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(second, dtype=int)).max() > 10


def test_a_lora_changes_the_image_and_scale_zero_gives_the_base_image(tmp_path, capsys, tiny_checkpoint):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from jsd.lora_weights import LORA_WEIGHT_NAME, UNET_TARGET_MODULES, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGET_MODULES)))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a LoRA that changes nothing): make it do something
            torch.nn.init.normal_(parameter, std=0.5)
    save_lora(tmp_path, unet)
    common = ["猫 油絵", "--weights", str(tiny_checkpoint), "--width", "128", "--height", "128", "--steps", "2"]
    common += ["--seed", "3"]

    def image(name: str, *extra: str) -> np.ndarray:
        generate(capsys, *common, *extra, "-o", str(tmp_path / name))
        return np.asarray(Image.open(tmp_path / name))

    base = image("base.png")
    lora = str(tmp_path / LORA_WEIGHT_NAME)
    assert np.abs(image("lora.png", "--lora_weights", lora).astype(int) - base).max() > 8
    assert np.array_equal(image("zero.png", "--lora_weights", lora, "--lora_scale", "0"), base)
    with pytest.raises(SystemExit) as exc:
        main(["generate", *common, "--lora_weights", lora, "--lora_scale", "3", "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "lora_scale" in capsys.readouterr().err


def test_img2img_and_inpaint(tmp_path, capsys, tiny_checkpoint):
    Image.new("RGB", (80, 48), (10, 200, 30)).save(tmp_path / "in.png")
    mask = Image.new("L", (80, 48), 0)
    mask.paste(255, (0, 0, 40, 48))
    mask.save(tmp_path / "mask.png")
    common = ["猫", "--weights", str(tiny_checkpoint), "--width", "128", "--height", "128", "--steps", "2"]
    generate(
        capsys, *common, "--image", str(tmp_path / "in.png"), "--no-prompt_weighting", "-o", str(tmp_path / "i2i.png")
    )
    assert read_metadata(tmp_path / "i2i.png")["prompt_weighting"] == "False"
    assert Image.open(tmp_path / "i2i.png").size == (128, 128)
    generate(
        capsys,
        *common,
        "--image",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "-o",
        str(tmp_path / "inp.png"),
    )
    assert Image.open(tmp_path / "inp.png").size == (128, 128)
    assert read_metadata(tmp_path / "inp.png")["mode"] == "inpaint"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "/nonexistent/weights"], "--weights /nonexistent/weights: no such folder"),
        (["--mask", "m.png"], "`mask` was given without `image`"),
        (["--image", "not-an-image.txt"], "`image` could not be read as an image"),
        (["--width", "200"], "`width` must be a multiple of 64"),
        (["--scheduler", "fastest"], "`scheduler` must be one of 'DPM-Solver++ 2M'"),
        (["-o", "out.gif"], "-o out.gif: the file name must end in .png, .webp or .jpg"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, tiny_checkpoint, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-an-image.txt").write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "猫", "--weights", str(tiny_checkpoint), *args])
    assert exit_info.value.code == 2
    assert f"jsd: error: {message}" in capsys.readouterr().err


def test_module_entry_point_shows_help():
    result = subprocess.run([sys.executable, "-m", "jsd", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--seed" in result.stdout and "--mask" in result.stdout
