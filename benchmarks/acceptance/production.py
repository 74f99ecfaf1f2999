"""The production path: cold ``Predictor.setup()`` in a fresh process, phase by phase, fp16, SDPA, no fp32 copy on
the GPU; then txt2img, img2img and inpaint through coglet on 127.0.0.1 (``jsd.coghttp``), outputs decoded.

``python -m acceptance.production FOLDER`` (benchmarks/ on the path) is the fresh process of the cold set-up: it
prints its phases and checks as JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from acceptance.context import Context, half_mask, load_repo_module, synchronize, timed
from acceptance.plan import GIB, PROMPT, REPO
from acceptance.runner import Check, Step, StepResult, hard_limit_s

FP32_COPY_SLACK = 64 * 2**20  # CUDA memory beyond the weights that is not a second copy of them


def step_production(ctx: Context, result: StepResult) -> None:
    """Cold ``Predictor.setup()`` in a fresh process, then the three modes through coglet."""
    cold = cold_setup(ctx.weights())
    result.figures["setup_cold_s"] = cold["phases"]
    if cold["evict_error"]:
        result.notes.append(f"the page cache could not be emptied ({cold['evict_error']}): the setup ran warm")
    result.figures["process_start_to_ready_s"] = cold["wall_s"]
    result.notes.append(
        "setup phases are timed from outside predict.py (wrapping verify_manifest, from_pretrained, "
        "load_pipeline and optimize_pipeline); to-device = load_pipeline minus from_pretrained; the checkpoint's "
        "files are evicted from the page cache first"
    )
    for check in cold["checks"]:
        result.checks.append(Check(**check))
    result.figures["coglet"] = through_coglet(ctx, result)


def cold_setup(folder: Path) -> dict:
    """:func:`child_setup` in a fresh interpreter (this module as ``__main__``), the files out of the page cache."""
    from bench_setup import evict

    try:
        evict(folder)
        evict_error = None
    except OSError as err:  # e.g. a sandboxed kernel without posix_fadvise
        evict_error = f"{type(err).__name__}: {err}"
    cmd = [sys.executable, "-m", "acceptance.production", str(folder)]
    path = [str(REPO), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(path)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"cold Predictor.setup() failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return child | {"wall_s": round(wall, 2), "evict_error": evict_error}


def child_setup(folder: str) -> dict:
    """In a fresh process: import, then ``Predictor().setup()`` with every phase timed, then the checks."""
    start = time.perf_counter()
    import torch  # noqa: F401 (imports are a phase of their own)

    from jsd import serving
    from jsd.pipelines import JapaneseStableDiffusionPipeline

    predict = load_repo_module("predict.py", "predict")
    imported = time.perf_counter()
    seconds: dict[str, float] = {}
    os.environ["JSD_WEIGHTS"] = folder
    with contextlib.ExitStack() as stack:
        stack.enter_context(timed(predict, "verify_manifest", seconds, "verify"))
        stack.enter_context(timed(JapaneseStableDiffusionPipeline, "from_pretrained", seconds, "load"))
        stack.enter_context(timed(serving, "load_pipeline", seconds, "load_and_to_device"))
        stack.enter_context(timed(predict, "optimize_pipeline", seconds, "fast_path"))
        predictor = predict.Predictor()
        predictor.setup()
        synchronize()
    ready = time.perf_counter()
    setup_s = ready - imported
    phases = {
        "imports": imported - start,
        "verify": seconds.get("verify"),
        "load": seconds.get("load"),
        "to_device": _minus(seconds.get("load_and_to_device"), seconds.get("load")),
        "fast_path": seconds.get("fast_path"),
    }
    phases["other"] = setup_s - sum(v for k, v in phases.items() if k != "imports" and v is not None)
    phases["setup_total"] = setup_s
    phases["ready"] = ready - start
    checks = served_checks(predictor.generator.pipeline)
    return {
        "phases": {k: None if v is None else round(v, 2) for k, v in phases.items()},
        "checks": [dataclasses.asdict(c) for c in checks],
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def served_checks(pipe) -> list[Check]:
    """fp16 on CUDA, SDPA everywhere, and nothing on the GPU beyond one copy of the weights."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import PreTrainedModel

    models = {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "safety_checker") if getattr(pipe, n, None)}
    tensors = [(n, t) for n, m in models.items() for t in [*m.parameters(), *m.buffers()]]
    cuda = pipe.device.type == "cuda"
    checks = []
    floats = {(t.device.type, str(t.dtype).removeprefix("torch.")) for _, t in tensors if t.is_floating_point()}
    if cuda:
        ok = floats == {("cuda", "float16")}
        checks.append(Check("fp16 on CUDA", "pass" if ok else "fail", f"floating weights: {sorted(floats)}"))
    else:
        checks.append(Check("fp16 on CUDA", "n/a", f"n/a on CPU (serves {sorted(floats)} on CPU, by design)"))
    kinds = {n: sorted({type(p).__name__ for p in models[n].attn_processors.values()}) for n in ("unet", "vae")}
    for name in ("text_encoder", "safety_checker"):
        if name in models:
            # as jsd.optimize.use_sdpa: the models that have attention (the checker's CLIP, not its wrapper)
            attention = [m for m in models[name].modules() if isinstance(m, PreTrainedModel) and m._supports_sdpa]
            kinds[name] = sorted({m.config._attn_implementation for m in attention})
    sdpa = all(k == [AttnProcessor2_0.__name__] for n, k in kinds.items() if n in ("unet", "vae")) and all(
        k == ["sdpa"] for n, k in kinds.items() if n not in ("unet", "vae")
    )
    checks.append(Check("SDPA attention", "pass" if sdpa else "fail", json.dumps(kinds)))
    if cuda:
        synchronize()
        weights = sum(t.numel() * t.element_size() for _, t in tensors if t.device.type == "cuda")
        allocated = torch.cuda.memory_allocated()
        fp32 = sorted({n for n, t in tensors if t.device.type == "cuda" and t.dtype == torch.float32})
        ok = not fp32 and allocated <= weights + FP32_COPY_SLACK
        detail = f"allocated {allocated / GIB:.2f} GiB for {weights / GIB:.2f} GiB of weights; fp32 in {fp32 or 'none'}"
        checks.append(Check("no fp32 copy left on the GPU", "pass" if ok else "fail", detail))
    else:
        checks.append(Check("no fp32 copy left on the GPU", "n/a", "n/a on CPU"))
    return checks


def through_coglet(ctx: Context, result: StepResult) -> dict:
    """coglet on 127.0.0.1 with the weights: time to READY, then txt2img, img2img and inpaint."""
    from jsd.coghttp import client, datauri, local

    workdir = ctx.workdir / "coglet"
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    side = ctx.plan.side
    base = {"prompt": PROMPT, "seed": 42, "width": side, "height": side, "num_inference_steps": ctx.plan.steps}
    base["output_format"] = "png"
    with (
        open(workdir / "coglet.log", "wb") as log,
        local.running_server(ctx.weights(), workdir=workdir, log=log) as (url, process),
    ):
        start = time.perf_counter()
        state = client.wait_for_setup(url, process, timeout=hard_limit_s(result.budget_s))
        figures["start_to_ready_s"] = round(time.perf_counter() - start, 2)
        if state["status"] != "READY":
            raise RuntimeError(f"coglet setup failed: {str(state.get('setup', state))[-2000:]}")
        image_uri = None
        for mode in ("txt2img", "img2img", "inpaint"):
            inputs = dict(base)
            if mode != "txt2img":
                inputs |= {"image": image_uri, "prompt_strength": 0.6}
            if mode == "inpaint":
                inputs["mask"] = png_data_uri(half_mask(side))
            seconds, outputs = _predict(url, inputs, workdir / mode)
            image_uri = image_uri or datauri.encode_file(outputs[0])
            figures[f"{mode}_s"] = round(seconds, 2)
            sizes = [_decoded_size(p) for p in outputs]
            result.check(f"{mode} through coglet: output decodes", sizes == [(side, side)], f"decoded sizes {sizes}")
    return figures


def _predict(url: str, inputs: dict, folder: Path) -> tuple[float, list[Path]]:
    """One synchronous prediction (the client retries a 409: coglet frees its slot just after answering)."""
    from jsd.coghttp import client, datauri
    from jsd.coghttp.errors import error_text

    start = time.perf_counter()
    status, body = client.post_prediction(url, inputs)
    seconds = time.perf_counter() - start
    if status != 200 or body.get("status") != "succeeded":
        outcome = f"Prediction {body.get('status')}" if status == 200 else f"The server answered HTTP {status}"
        raise RuntimeError(f"{outcome}: {error_text(status, body)}")
    return seconds, datauri.write_prediction_output(body["output"], folder)


def png_data_uri(image) -> str:
    """A PIL image as a PNG data URI (a Cog file input)."""
    from jsd.coghttp.datauri import encode_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return encode_bytes(buffer.getvalue(), "image/png")


def _decoded_size(path: Path) -> tuple[int, int] | str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except OSError as err:
        return f"undecodable: {err}"


STEP = Step("production", "production path: cold Predictor.setup(), run() through coglet", step_production)

if __name__ == "__main__":  # the fresh process of cold_setup()
    print(json.dumps(child_setup(sys.argv[1])))
