"""GPU behaviour of the serving fast path: dtype, attention, memory format and memory use on CUDA.

Deselected by default; run on a CUDA machine with::

    pytest -m gpu tests/test_gpu.py                       # full-size random weights (SD v1 shapes)
    JSD_WEIGHTS=weights/ pytest -m gpu tests/test_gpu.py  # the real served checkpoint

Memory figures are what PyTorch allocates, so they hold for a 16 GB T4 whatever card runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from jsd import JapaneseStableDiffusionPipeline, JapaneseTokenizer, optimize
from jsd.serving import MAX_PIXELS, MAX_SIDE
from jsd.tiny import build_pipeline, corpus_lines
from jsd.tokenizer_training import train_sentencepiece

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
T4_USABLE_BYTES = 15 * 2**30  # a T4 has 16 GB; about 15 GiB of it is usable by PyTorch


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, rinna_spiece_or_none):
    folder = os.environ.get("JSD_WEIGHTS")
    if folder:
        pipe = JapaneseStableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float16, use_safetensors=True, local_files_only=True
        )
    else:
        tokenizer = (
            JapaneseTokenizer(str(rinna_spiece_or_none))
            if rinna_spiece_or_none
            else train_sentencepiece(corpus_lines(), tmp_path_factory.mktemp("tok"), vocab_size=2000)
        )
        pipe = build_pipeline(tokenizer, size="full").to(dtype=torch.float16)
    optimize.optimize_pipeline(pipe, "cuda", compile=False, warmup=False)
    return pipe


@pytest.fixture(scope="module")
def rinna_spiece_or_none() -> Path | None:
    """rinna's tokenizer when ../shared has it (the text encoder then has the real 32,000-row embedding)."""
    path = Path(os.environ.get("JSD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = path / "data" / "tokenizer" / "google_sp.model"
    return path if path.is_file() else None


def _peak_bytes(fn) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def test_fast_path_puts_fp16_weights_sdpa_and_channels_last_on_the_gpu(pipe):
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        params = list(getattr(pipe, name).parameters())
        assert {p.device.type for p in params} == {"cuda"}, name
        assert {p.dtype for p in params} == {torch.float16}, name
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_generation_at_512_returns_finite_images_without_autocast(pipe):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args: seen.append((torch.is_autocast_enabled("cuda"), args[0].dtype))
    )
    try:
        images = pipe(
            "サラリーマン 油絵", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
    finally:
        handle.remove()
    assert images.shape == (1, 512, 512, 3)
    assert set(seen) == {(False, torch.float16)}
    assert float(abs(images).max()) <= 1.0 and not (images != images).any()


@pytest.mark.parametrize(("side_w", "side_h", "batch"), [(512, 512, 1), (768, 768, 4), (MAX_SIDE, MAX_SIDE, 1)])
def test_the_largest_requests_fit_a_t4(pipe, side_w, side_h, batch):
    assert side_w * side_h * batch <= MAX_PIXELS
    peak = _peak_bytes(
        lambda: pipe(
            "サラリーマン 油絵",
            num_inference_steps=2,
            width=side_w,
            height=side_h,
            num_images_per_prompt=batch,
            output_type="np",
        )
    )
    assert peak < T4_USABLE_BYTES, f"{side_w}x{side_h} x{batch} peaked at {peak / 2**30:.2f} GiB"


def test_vae_tiling_bounds_decode_memory_above_the_tile_size(pipe):
    tile = optimize.VAE_TILE_SIZE // 8
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        whole = _peak_bytes(
            lambda: pipe.vae.decode(torch.randn(1, 4, tile, tile, device="cuda", dtype=torch.float16) / scale)
        )
        tiled = _peak_bytes(
            lambda: pipe.vae.decode(torch.randn(1, 4, 2 * tile, 2 * tile, device="cuda", dtype=torch.float16) / scale)
        )
    # Four times the pixels, but decoded in tiles no larger than the untiled maximum.
    assert tiled < 1.5 * whole, f"tiled {tiled / 2**30:.2f} GiB vs whole {whole / 2**30:.2f} GiB"
