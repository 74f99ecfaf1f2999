"""Command line: ``python -m jsd generate "プロンプト" -o out.png``, ``python -m jsd tokenize "プロンプト"``.

python -m jsd generate "サラリーマン 油絵" --seed 42 --steps 25 -o out.png
python -m jsd generate "猫 水彩画" --image in.png --strength 0.6 -o cat.png        # img2img
python -m jsd generate "犬" --image in.png --mask mask.png -o dog.png             # inpaint
python -m jsd tokenize "サラリーマン (油絵:1.3)" --prompt_weighting                  # token report
python -m jsd playground                                          # the browser form, http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jsd.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

DEFAULT_WEIGHTS = os.environ.get("JSD_WEIGHTS", "weights")


class CLIError(Exception):
    """A user error: printed as ``jsd: error: …`` with exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jsd", description="Japanese Stable Diffusion (rinna) on diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a Japanese prompt")
    gen.add_argument("prompt", help='the prompt, e.g. "サラリーマン 油絵"')
    gen.add_argument("--negative_prompt", "--negative-prompt", default=None)
    gen.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint folder (default: $JSD_WEIGHTS or weights/)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: random; printed)")
    gen.add_argument("--steps", "--num_inference_steps", dest="num_inference_steps", type=int, default=25)
    gen.add_argument("--guidance_scale", "--guidance-scale", type=float, default=7.5)
    gen.add_argument("--width", type=int, default=512)
    gen.add_argument("--height", type=int, default=512)
    gen.add_argument("--num_outputs", "--num-outputs", type=int, default=1)
    gen.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"one of {', '.join(SCHEDULERS)}")
    gen.add_argument("--image", type=Path, help="init image: img2img, or inpaint with --mask")
    gen.add_argument("--mask", type=Path, help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", "--prompt_strength", dest="prompt_strength", type=float, default=0.8)
    gen.add_argument("--disable_safety_checker", "--disable-safety-checker", action="store_true")
    gen.add_argument(
        "--prompt_weighting", "--prompt-weighting", action="store_true", help="parse (text:1.3) emphasis weights"
    )
    gen.add_argument(
        "--lora_weights", "--lora-weights", help="a LoRA: URL, data URI or path of a trainer .tar or a .safetensors"
    )
    gen.add_argument("--lora_scale", "--lora-scale", type=float, default=1.0, help="LoRA strength, 0-2 (0: base model)")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="output file (numbered if several)")
    gen.set_defaults(func=cmd_generate)
    _add_tokenize_parser(commands)
    _add_playground_parser(commands)
    return parser


def _add_playground_parser(commands) -> None:
    play = commands.add_parser("playground", help="the model's form in the browser, over Cog's HTTP API")
    play.add_argument("--api", help="a running Cog server of this model (default: start one on weights/)")
    play.add_argument(
        "--weights", default=DEFAULT_WEIGHTS, help="checkpoint served without --api (default: %(default)s)"
    )
    play.add_argument("--port", type=int, default=7860, help="the page's port on 127.0.0.1 (default: %(default)s)")
    play.add_argument("--setup_timeout", "--setup-timeout", type=float, default=600, help="seconds to wait for setup()")
    play.set_defaults(func=cmd_playground)


def cmd_playground(args: argparse.Namespace) -> None:
    """Serve the playground until Ctrl+C; a bad --api or schema is one error line."""
    try:
        from jsd.playground.app import serve
        from jsd.playground.cog_api import PlaygroundError
        from jsd.playground.form import SchemaError
    except ImportError as err:
        raise CLIError(f"the playground needs the playground extra ({err}): pip install -e '.[playground]'") from None
    try:
        serve(api_url=args.api, weights=args.weights, port=args.port, setup_timeout=args.setup_timeout)
    except PlaygroundError as err:
        raise CLIError(f"--api {args.api}: {err}" if args.api else str(err)) from None
    except SchemaError as err:
        raise CLIError(f"the server's /openapi.json is not a Cog model's schema: {err}") from None


def _add_tokenize_parser(commands) -> None:
    tok = commands.add_parser("tokenize", help="show how a prompt is tokenized: pieces, count, chunks, truncation")
    tok.add_argument("prompt", help='the prompt, e.g. "サラリーマン (油絵:1.3)"')
    source = tok.add_mutually_exclusive_group()
    source.add_argument("--weights", help="checkpoint folder holding tokenizer/ (default: $JSD_WEIGHTS or weights/)")
    source.add_argument("--tokenizer", help="a spiece.model file or a tokenizer folder")
    tok.add_argument(
        "--prompt_weighting",
        "--prompt-weighting",
        action="store_true",
        help="parse (text:1.3) weights, as prompt_weighting=True in the library (on by default in the Cog predictor)",
    )
    tok.add_argument("--max_prompt_chunks", "--max-prompt-chunks", type=int, default=3, help="chunks of 77 ids kept")
    tok.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Print the token report of a prompt: what the text encoder will see and what is truncated."""
    from jsd.prompting import tokenize_report

    source = args.tokenizer or args.weights
    try:
        report = tokenize_report(
            args.prompt, source, prompt_weighting=args.prompt_weighting, max_prompt_chunks=args.max_prompt_chunks
        )
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    print(report)


def cmd_generate(args: argparse.Namespace) -> None:
    """Check the inputs, load the checkpoint once, generate, write the images and print the seeds."""
    from jsd import serving

    request = serving.GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        width=args.width,
        height=args.height,
        num_outputs=args.num_outputs,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        image=args.image,
        mask=args.mask,
        prompt_strength=args.prompt_strength,
        output_format=_output_format(args.output),
        disable_safety_checker=args.disable_safety_checker,
        prompt_weighting=args.prompt_weighting,
        lora_weights=args.lora_weights,
        lora_scale=args.lora_scale,
    )
    weights = Path(args.weights)
    try:
        checked = request.validate()  # before loading anything: a bad input costs nothing
        request.seed = checked.seed
        if not weights.is_dir():
            raise CLIError(f"--weights {weights}: no such folder (run scripts/download_weights.py or make demo)")
        print(f"seed: {checked.seed}")
        generator = serving.ImageGenerator(serving.load_pipeline(weights, device=args.device))
        result = generator.generate(request)
    except serving.InputError as err:
        raise CLIError(str(err)) from None
    except serving.GenerationError as err:
        raise CLIError(str(err)) from None
    _save(result, args.output)


def _output_format(output: Path) -> str:
    suffix = output.suffix.lower().lstrip(".")
    formats = {"png": "png", "webp": "webp", "jpg": "jpg", "jpeg": "jpg"}
    if suffix not in formats:
        raise CLIError(f"-o {output}: the file name must end in .png, .webp or .jpg")
    return formats[suffix]


def _save(result, output: Path) -> None:
    from jsd.serving import save_image

    output.parent.mkdir(parents=True, exist_ok=True)
    several = len(result.seeds) > 1
    for item in result.images:
        path = output.with_name(f"{output.stem}-{item.index}{output.suffix}") if several else output
        save_image(item.image, path, metadata=item.metadata, quality=result.output_quality)
        print(f"wrote {path} (seed {item.seed})")
    for seed in result.flagged_seeds:
        print(f"the image with seed {seed} was flagged by the safety checker and not saved")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CLIError as err:
        parser.exit(2, f"jsd: error: {err}\n")
    except KeyboardInterrupt:
        sys.exit(130)
