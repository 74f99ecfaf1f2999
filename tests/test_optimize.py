"""The serving fast path (jsd.optimize) and the cold-start contract, checked on CPU with tiny models.

GPU behaviour (fp16 speed, peak VRAM) is in tests/test_gpu.py behind the ``gpu`` marker.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import runpy
import socket
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models import modeling_utils
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from diffusers.models.autoencoders.vae import DecoderOutput
from torch.utils._python_dispatch import TorchDispatchMode

from jsd import JapaneseStableDiffusionPipeline, optimize, serving
from jsd.tiny import make_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def pipe(tiny_checkpoint):
    """A fresh tiny pipeline (the fast path changes it in place)."""
    return JapaneseStableDiffusionPipeline.from_pretrained(tiny_checkpoint)


def _generate(pipe, **kwargs) -> np.ndarray:
    args = {"num_inference_steps": 1, "height": 64, "width": 64, "output_type": "np"} | kwargs
    return pipe("赤い花", generator=torch.Generator().manual_seed(0), **args).images


def test_serving_dtype_is_fp16_on_cuda_only():
    assert optimize.serving_dtype("cuda") == torch.float16
    assert optimize.serving_dtype(torch.device("cuda:1")) == torch.float16
    assert optimize.serving_dtype("cpu") == torch.float32


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_env_flag_on(value):
    assert optimize.env_flag("JSD_TORCH_COMPILE", {"JSD_TORCH_COMPILE": value})


@pytest.mark.parametrize(
    "environ", [{}, {"JSD_TORCH_COMPILE": ""}, {"JSD_TORCH_COMPILE": "0"}, {"JSD_TORCH_COMPILE": "off"}]
)
def test_env_flag_off(environ):
    assert not optimize.env_flag("JSD_TORCH_COMPILE", environ)


def test_env_flag_rejects_unknown_values_naming_the_variable():
    with pytest.raises(ValueError, match=r"`JSD_TORCH_COMPILE` is 'maybe'.*'1'"):
        optimize.env_flag("JSD_TORCH_COMPILE", {"JSD_TORCH_COMPILE": "maybe"})


def test_plan_for_cuda_is_fp16_channels_last_without_compile_by_default():
    plan = optimize.plan_fast_path("cuda", environ={})
    assert (plan.dtype, plan.channels_last, plan.compile, plan.warmup) == (torch.float16, True, False, False)
    cpu = optimize.plan_fast_path("cpu", environ={})
    assert (cpu.dtype, cpu.channels_last, cpu.compile, cpu.warmup) == (torch.float32, False, False, False)


def test_plan_reads_compile_and_warmup_flags():
    compiled = optimize.plan_fast_path("cuda", environ={"JSD_TORCH_COMPILE": "1"})
    assert compiled.compile and compiled.warmup  # compiling warms up at start-up, not in the first prediction
    assert optimize.plan_fast_path("cuda", environ={"JSD_WARMUP": "1"}).warmup
    assert not optimize.plan_fast_path("cuda", compile=False, environ={"JSD_TORCH_COMPILE": "1"}).compile


def test_every_model_ends_on_sdpa_attention_and_images_do_not_change(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())  # the classic, pre-torch-2 attention
    pipe.vae.set_attn_processor(AttnProcessor())
    pipe.text_encoder.set_attn_implementation("eager")
    reference = _generate(pipe)
    pipe.unet.set_attn_processor(XFormersAttnProcessor())  # as an old setup may leave it; never used by us

    report = optimize.optimize_pipeline(pipe, "cpu", compile=False, warmup=False)

    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.vae.attn_processors.values())
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert pipe.safety_checker.vision_model.config._attn_implementation == "sdpa"
    assert report.attention == {
        "unet": ["AttnProcessor2_0"],
        "vae": ["AttnProcessor2_0"],
        "text_encoder": ["sdpa"],
        "safety_checker": ["sdpa"],
    }
    np.testing.assert_allclose(_generate(pipe), reference, atol=1e-4)


def test_cuda_plan_converts_weights_to_fp16_and_unet_to_channels_last(pipe):
    # The CUDA plan applied to CPU tensors: the same conversions, checkable without a GPU.
    plan = dataclasses.replace(optimize.plan_fast_path("cuda", environ={}), device=torch.device("cpu"))
    report = optimize.apply_fast_path(pipe, plan)

    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float16}, name
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (report.dtype, report.channels_last) == ("float16", ["unet"])


def test_cpu_plan_keeps_fp32_and_the_default_memory_format(pipe):
    report = optimize.optimize_pipeline(pipe, "cpu", compile=False, warmup=False)
    assert pipe.unet.dtype == torch.float32
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert report.channels_last == []


def test_no_autocast_weights_and_activations_share_the_dtype(pipe):
    optimize.optimize_pipeline(pipe, "cpu", compile=False, warmup=False)
    seen = []

    def record(module, args, kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), args[0].dtype))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _generate(pipe)
    finally:
        handle.remove()
    assert seen == [(False, False, pipe.unet.dtype)]


@pytest.fixture
def cheap_vae(pipe):
    """The pipeline's VAE with the fast path's settings and a no-op decoder (only the routing is tested)."""
    optimize.configure_vae(pipe.vae)
    pipe.vae.decoder = torch.nn.Identity()
    return pipe.vae


def _decode_calls(vae, monkeypatch, latent_side: int, batch: int = 1) -> tuple[int, int]:
    tiled, whole = [], []
    decode = type(vae)._decode
    monkeypatch.setattr(
        vae, "tiled_decode", lambda z, return_dict=True: tiled.append(z.shape) or DecoderOutput(sample=z)
    )
    monkeypatch.setattr(vae, "_decode", lambda z, return_dict=True: whole.append(z.shape) or decode(vae, z))
    vae.decode(torch.zeros(batch, 4, latent_side, latent_side))
    return len(tiled), len(whole)


def test_vae_decodes_in_one_piece_up_to_the_tile_size(cheap_vae, monkeypatch):
    side = optimize.VAE_TILE_SIZE // 8
    assert _decode_calls(cheap_vae, monkeypatch, side) == (0, 1)


def test_vae_tiles_images_larger_than_the_tile_size(cheap_vae, monkeypatch):
    side = optimize.VAE_TILE_SIZE // 8 + 8
    assert _decode_calls(cheap_vae, monkeypatch, side) == (1, 1)
    assert cheap_vae.tile_latent_min_size * 8 == cheap_vae.tile_sample_min_size == optimize.VAE_TILE_SIZE


def test_vae_decodes_a_batch_one_image_at_a_time(cheap_vae, monkeypatch):
    assert _decode_calls(cheap_vae, monkeypatch, 64, batch=3) == (0, 3)


def test_vae_tile_size_must_be_a_multiple_of_the_latent_scale(pipe):
    with pytest.raises(ValueError, match=r"`tile_size` must be a multiple of 8 pixels, got 1020"):
        optimize.configure_vae(pipe.vae, tile_size=1020)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own
def test_compiled_unet_equals_eager_on_its_first_real_call(pipe, monkeypatch):
    """``JSD_TORCH_COMPILE=1`` as setup() applies it: inductor (gcc on CPU), COMPILE_KWARGS, in place.

    The warm-up compiles (on 2 busy cores 1-4 min cold, about 20 s from inductor's cache in
    /tmp/torchinductor_$USER); the generation after it must equal eager within atol 1e-4 on images in
    [0, 1] (measured: 3e-6; fused kernels reorder fp32 sums).
    """
    reference = _generate(pipe, num_inference_steps=2)
    monkeypatch.setenv("JSD_TORCH_COMPILE", "1")
    monkeypatch.setattr(optimize, "WARMUP_SIZE", 64)  # the shapes of _generate: no second compilation
    report = optimize.optimize_pipeline(pipe, "cpu")

    assert report.compiled
    assert pipe.unet._compiled_call_impl is not None
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # the pipeline keeps its class and config
    np.testing.assert_allclose(_generate(pipe, num_inference_steps=2), reference, atol=1e-4, rtol=0)


def test_compile_is_off_by_default(pipe, monkeypatch):
    monkeypatch.delenv("JSD_TORCH_COMPILE", raising=False)
    monkeypatch.delenv("JSD_WARMUP", raising=False)
    report = optimize.optimize_pipeline(pipe, "cpu")
    assert not report.compiled and report.warmup_s is None
    assert pipe.unet._compiled_call_impl is None


def test_warm_up_generates_once_and_leaves_the_global_rng_alone(pipe, monkeypatch):
    monkeypatch.setattr(optimize, "WARMUP_SIZE", 64)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    state = torch.get_rng_state()
    start = time.perf_counter()
    report = optimize.optimize_pipeline(pipe, "cpu", compile=False, warmup=True)
    assert 0 < report.warmup_s <= time.perf_counter() - start  # seconds of the warm-up, within the call's
    # One generation of WARMUP_STEPS (PNDM evaluates one extra timestep), classifier-free guidance batch 2.
    assert calls == [torch.Size([2, 4, 8, 8])] * len(pipe.scheduler.timesteps)
    assert torch.equal(torch.get_rng_state(), state)


def test_safety_checker_runs_once_on_the_whole_batch(pipe):
    optimize.optimize_pipeline(pipe, "cpu", compile=False, warmup=False)
    batches = []
    pipe.safety_checker.register_forward_hook(
        lambda module, args, kwargs, output: batches.append(kwargs["clip_input"].shape[0]), with_kwargs=True
    )
    images = _generate(pipe, num_images_per_prompt=3)
    assert len(images) == 3
    assert batches == [3]


RANDOM_OPS = frozenset(
    {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_"}
    | {"normal", "bernoulli", "randn", "rand", "randint", "randperm", "randn_like", "rand_like"}
)


class RandomFills(TorchDispatchMode):
    """Counts, per device, the random-number ops that run (``normal_``, ``uniform_``, ``randn`` …).

    At the dispatcher, below ``torch.nn.init`` and whatever copies of it diffusers or transformers call,
    so no library's own init functions can slip past it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.devices: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in RANDOM_OPS:
            self.devices[out.device.type if isinstance(out, torch.Tensor) else "other"] += 1
        return out


def test_loading_fills_no_weight_with_random_numbers_before_reading_it(tiny_checkpoint):
    """Cold start: every model is built on the meta device and filled from the files, never initialised first.

    The CLIP models still run their init functions, on meta tensors (they cost nothing there): the count
    of those shows the mode sees the libraries' init at all.
    """
    with RandomFills() as fills:
        pipe = serving.load_pipeline(tiny_checkpoint, device="cpu")
    assert fills.devices["meta"] > 0, fills.devices
    assert set(fills.devices) == {"meta"}, fills.devices
    assert pipe.unet.device.type == "cpu" and pipe.safety_checker is not None


def test_loading_opens_no_network_connection(tiny_checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(tiny_checkpoint, use_safetensors=True)
    assert pipe.safety_checker is not None


def test_fp16_checkpoint_loads_as_fp16_without_conversion(tmp_path):
    folder = make_checkpoint(tmp_path / "fp16", torch_dtype=torch.float16)
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, use_safetensors=True)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    assert not list(folder.rglob("*.bin"))


def _run_script(name: str, argv: list[str], monkeypatch) -> str:
    """Run a benchmark script in this process as ``python benchmarks/NAME`` would (its folder on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    return out.getvalue()


ARMS = ("jsd", "diffusers")


def _rss_bytes() -> int:
    """This process's resident set size now, from /proc (0 where there is none)."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else 0


def test_bench_pipeline_runs_end_to_end_in_tiny_mode(monkeypatch):
    out = _run_script(
        "bench_pipeline.py",
        ["--size", "tiny", "--steps", "1", "--repeats", "1", "--height", "64", "--width", "64"],
        monkeypatch,
    )
    assert "device: cpu" in out
    lines = out.splitlines()
    jsd_s, diffusers_s = (float(next(x for x in lines if x.split()[:1] == [arm]).split()[1]) for arm in ARMS)
    ratio_line = next(line for line in lines if line.startswith("overhead ratio"))
    ratio = float(ratio_line.split()[-1])
    # jsd / diffusers from the printed seconds (3 decimals each), up to that rounding and the ratio's own
    assert (jsd_s - 5e-4) / (diffusers_s + 5e-4) - 5e-4 <= ratio <= (jsd_s + 5e-4) / (diffusers_s - 5e-4) + 5e-4
    if abs(ratio - 1.03) > 5e-4:  # the verdict agrees with the ratio (the printed one is rounded)
        assert (", met)" if ratio <= 1.03 else ", NOT met)") in ratio_line
    paired = next(line for line in lines if "paired ratio" in line)
    assert float(paired.split()[-1]) == ratio  # one repeat: the median of per-repeat ratios is the same ratio
    diff_line = next(line for line in out.splitlines() if line.startswith("max |jsd - diffusers|"))
    assert float(diff_line.split()[-1]) < 1e-5  # same components, same seed: the same images


def test_bench_setup_arms_load_the_same_weights_from_both_layouts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))  # predict.py, for the `setup` arm
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("JSD_WEIGHTS", "unset")  # the `setup` arm sets it; restored afterwards
    monkeypatch.setattr(modeling_utils, "_LOW_CPU_MEM_USAGE_DEFAULT", True)  # the `2022-init` arm changes
    monkeypatch.setattr(modeling_utils, "no_init_weights", modeling_utils.no_init_weights)  # both; restored
    import bench_setup

    served = make_checkpoint(tmp_path / "served", torch_dtype=torch.float16)
    legacy = bench_setup.write_2022_copy(served, tmp_path / "rinna-2022")

    assert (legacy / "unet" / "diffusion_pytorch_model.bin").is_file()
    legacy_text = torch.load(legacy / "text_encoder" / "pytorch_model.bin", weights_only=True)
    assert "text_model.embeddings.position_ids" in legacy_text  # 2022 names (tests/test_weights.py checks them all)
    assert not list(legacy.rglob("*.safetensors")) and not (legacy / "manifest.json").exists()
    old = JapaneseStableDiffusionPipeline.from_pretrained(legacy, torch_dtype=torch.float32, use_safetensors=False)
    new = JapaneseStableDiffusionPipeline.from_pretrained(served, torch_dtype=torch.float32, use_safetensors=True)
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        old_state, new_state = getattr(old, name).state_dict(), getattr(new, name).state_dict()
        assert old_state.keys() == new_state.keys(), name
        assert all(torch.equal(old_state[k], new_state[k]) for k in old_state), name
    for arm, folder in (("setup", served), ("served-fp16", served), ("2022", legacy), ("2022-init", legacy)):
        start = time.perf_counter()
        result = bench_setup.child(arm, str(folder), "cpu")
        assert 0 < result["setup_s"] <= time.perf_counter() - start, result
        assert result["peak_rss_bytes"] >= _rss_bytes(), result  # a peak in bytes (not KiB) is at least today's
        assert result["dtype"] == ("torch.float16" if arm == "served-fp16" else "torch.float32"), result
