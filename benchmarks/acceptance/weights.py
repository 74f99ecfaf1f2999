"""Set-up: seeded random weights in the served layout (fp16 safetensors and a manifest), reused from ``--workdir``."""

from __future__ import annotations

import shutil

from acceptance.context import Context
from acceptance.runner import Step, StepResult


def step_weights(ctx: Context, result: StepResult) -> None:
    """Seeded random weights in the served layout (fp16 safetensors + manifest); reused from --workdir."""
    import torch
    from bench_common import default_tokenizer_model

    from jsd.manifest import read_manifest, verify_manifest
    from jsd.tiny import TINY_SOURCE_PREFIX, make_checkpoint

    folder = ctx.workdir / f"weights-{ctx.plan.size}"
    source = f"{TINY_SOURCE_PREFIX} size={ctx.plan.size}"
    if (folder / "manifest.json").is_file() and read_manifest(folder).get("source", "").startswith(source):
        result.notes.append(f"reused the weights in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        tokenizer = default_tokenizer_model()
        make_checkpoint(folder, tokenizer_model=tokenizer, size=ctx.plan.size, torch_dtype=torch.float16)
        result.notes.append(f"tokenizer: {'rinna' if tokenizer else 'trained on the project corpus'}")
    manifest = verify_manifest(folder)
    result.check("the weights match their manifest", True, f"revision {manifest.get('revision')}")
    ctx.weights_folder = folder
    files = [p for p in folder.rglob("*") if p.is_file()]
    result.figures |= {
        "shapes": f"{ctx.plan.size} SD v1, random seeded weights",
        "files": len(files),
        "size_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1),
    }


STEP = Step("weights", "set-up: random seeded weights in the served layout, with a manifest", step_weights)
