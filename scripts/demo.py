"""`make demo`: images from "サラリーマン 油絵" through the Cog predictor (``Predictor.setup()`` + ``run()``).

    .venv/bin/python scripts/demo.py                 # weights from $JSD_WEIGHTS or weights/, images into outputs/

With real weights in ``weights/`` (a manifest from scripts/download_weights.py or scripts/train.py)
it uses them. Otherwise it copies the committed toy checkpoint there (``toy/weights``: a toy model of
shapes trained here by scripts/train_toy.py, not rinna's; docs/toy-world.md) and asks it for a shape;
without that either, it writes the tiny seeded checkpoint there first (rinna's real tokenizer from
``../shared/data/tokenizer/google_sp.model`` when present, else the project's own): the images are
then noise, but every step — manifest check, loading, validation, seeds, scheduler, safety checker,
file metadata — is the code Cog runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "サラリーマン 油絵"


def ensure_weights(folder: Path) -> str:
    """:func:`jsd.tiny.ensure_weights`, its refusal as the script's exit message."""
    from jsd.tiny import ensure_weights

    try:
        return ensure_weights(folder)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None


def load_predictor():
    """predict.py's ``Predictor``, loaded the way coglet loads it (from the file)."""
    spec = importlib.util.spec_from_file_location("predict", REPO / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Predictor()


def run_inputs(predictor, **inputs) -> dict:
    """``run()``'s declared defaults (as Cog fills them in) overridden by ``inputs``."""
    parameters = inspect.signature(predictor.run).parameters
    defaults = {name: getattr(p.default, "default", p.default) for name, p in parameters.items()}
    unknown = set(inputs) - set(defaults)
    if unknown:
        raise SystemExit(f"unknown inputs {sorted(unknown)}; run() takes {', '.join(defaults)}")
    return defaults | inputs


def main(argv: list[str] | None = None) -> int:
    # started by a Python without the project's packages (jsd alone may be found: PYTHONPATH at the checkout)
    missing = next((name for name in ("jsd", "torch") if importlib.util.find_spec(name) is None), None)
    if missing:
        from _venv import exit_with_hint  # this file's folder is sys.path[0]

        exit_with_hint(missing)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.environ.get("JSD_WEIGHTS", "weights"))
    parser.add_argument("--output", default="outputs", help="folder for the images (default: %(default)s)")
    parser.add_argument("--num_outputs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    from jsd.manifest import read_manifest
    from jsd.serving import read_metadata

    weights = Path(args.weights).resolve()
    kind = ensure_weights(weights)
    manifest = read_manifest(weights)
    print(f"weights: {kind} — revision {manifest.get('revision')}, source {manifest.get('source')}, at {weights}")

    os.environ["JSD_WEIGHTS"] = str(weights)
    predictor = load_predictor()
    predictor.setup()
    # The tiny model is fast at any size; keep CPU runs of the real model short.
    small = kind == "tiny" or predictor.generator.pipeline.device.type != "cuda"
    settings = {"width": 256, "height": 256, "num_inference_steps": 15} if small else {}
    prompt = PROMPT
    if kind == "toy":  # it knows 128×128 pictures of shapes and nothing else
        from jsd.toyworld import TOY_PROMPT

        settings, prompt = {"width": 128, "height": 128, "num_inference_steps": 25}, TOY_PROMPT
        print(f"prompt: {prompt} (the toy model only knows shapes, colors, positions, sizes and backgrounds)")
    inputs = run_inputs(
        predictor, prompt=prompt, num_outputs=args.num_outputs, seed=args.seed, output_format="png", **settings
    )
    paths = predictor.run(**inputs)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = output / f"demo-{path.name}"
        shutil.copyfile(path, target)
        print(f"wrote {target} (seed {read_metadata(target)['seed']})")
    if kind == "toy":
        print("(toy model of shapes trained here, not rinna's: docs/toy-world.md; real weights go in weights/)")
    if kind == "tiny":
        print("(tiny random weights: the images are noise; put real weights in weights/ for real pictures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
