"""Each upstream notice jsd drops (``jsd.notices``) is really emitted by its library, and dropped: only it.

The lines are produced the way the servers produce them (an import, a cast, a LoRA load, a checkpoint),
so a library that changes its wording or its logger makes these tests fail instead of the filter going
quietly stale.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import jsd  # noqa: F401 (installs the filters, as any use of jsd does)


@contextlib.contextmanager
def records(name: str) -> Iterator[list[str]]:
    """The messages that pass ``name``'s filters while the block runs (a handler on that logger itself)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_torchvision_notice_is_printed_without_jsd_and_not_with_it():
    code = "from transformers import CLIPImageProcessor, SiglipImageProcessor"
    without, with_jsd = (
        subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=120)
        for text in (code, f"import jsd; {code}")
    )

    assert without.stderr.count("requires torchvision (not installed)") == 2  # upstream still says it
    assert with_jsd.stderr == ""


def test_the_empty_float32_list_notice_is_dropped_and_a_real_one_kept():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=32)
    with records("diffusers.models.modeling_utils") as seen:
        vae.to("cpu", dtype=torch.float32)  # what jsd.training.models does with the frozen VAE
        vae._keep_in_fp32_modules = ["encoder"]
        vae.to("cpu", dtype=torch.float32)

    assert len(seen) == 1 and "should be kept in float32: ['encoder']" in seen[0]


def test_the_no_text_encoder_keys_notice_of_a_unet_only_lora_is_dropped(tiny_checkpoint, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from jsd import lora_weights as lora
    from jsd import serving

    pipe = serving.load_pipeline(tiny_checkpoint, device="cpu")
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(lora.UNET_TARGET_MODULES)))
    lora.save_lora(tmp_path, unet)
    with records("diffusers.loaders.lora_base") as seen, records("diffusers.loaders.peft") as others:
        lora.load_lora(pipe, lora.LoraFile(tmp_path / lora.LORA_WEIGHT_NAME, "0" * 64, "unet-only"))
        lora.unload_lora(pipe)
        logging.getLogger("diffusers.loaders.lora_base").warning("another warning")

    assert seen == ["another warning"] and others == []


@pytest.mark.parametrize(
    "message",
    [
        "Saving current state to /tmp/run/checkpoint-2.partial",
        "Optimizer state saved in /tmp/run/checkpoint-2.partial/optimizer.bin",
        "Random states saved in /tmp/run/checkpoint-2.partial/random_states_0.pkl",
    ],
)
def test_accelerates_per_file_checkpoint_lines_are_dropped_with_or_without_the_rank(message):
    from accelerate.logging import get_logger
    from accelerate.state import PartialState

    PartialState(cpu=True)
    name = "accelerate.accelerator" if message.startswith("Saving") else "accelerate.checkpointing"
    with records(name) as seen:
        get_logger(name).info(message)  # accelerate's adapter writes "[RANK 0] " before it
        logging.getLogger(name).info(message)
        get_logger(name).info("Loading states from /tmp/run/checkpoint-2")

    assert seen == ["[RANK 0] Loading states from /tmp/run/checkpoint-2"]
