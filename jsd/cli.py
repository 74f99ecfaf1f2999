"""Command line: ``jsd generate "プロンプト" -o out.png`` and ``jsd tokenize "プロンプト"`` (the venv's ``jsd``).

.venv/bin/python -m jsd generate "サラリーマン 油絵" --seed 42 --steps 25 -o out.png
.venv/bin/python -m jsd generate "猫 水彩画" --image in.png --strength 0.6 -o cat.png        # img2img
.venv/bin/python -m jsd generate "犬" --image in.png --mask mask.png -o dog.png             # inpaint
.venv/bin/python -m jsd generate "夕焼けの海を走る猫" --num_candidates 4 -o cat.png         # best-of-4 (Japanese CLIP)
.venv/bin/python -m jsd tokenize "サラリーマン (油絵:1.3)"                                     # token report
.venv/bin/python -m jsd filter-data data/images --min_clip_score 20                # Japanese CLIP data filter
.venv/bin/python -m jsd evaluate --weights out/stage2 --compare weights            # fine-tune vs base, CLIP score
.venv/bin/python -m jsd playground                                 # the browser form, http://127.0.0.1:7860
.venv/bin/python -m jsd distill --pretrained_model_name_or_path weights --train_data_dir data/images  # LCM-LoRA
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
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
    gen.add_argument(
        "--num_candidates",
        "--num-candidates",
        type=int,
        default=1,
        help="best-of-N: N candidates per image, the one the Japanese CLIP in WEIGHTS/japanese_clip/ scores highest "
        "is saved (as Cog's `num_candidates`; default: 1)",
    )
    gen.add_argument("--image", type=Path, help="init image: img2img, or inpaint with --mask")
    gen.add_argument("--mask", type=Path, help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", "--prompt_strength", dest="prompt_strength", type=float, default=0.8)
    gen.add_argument("--disable_safety_checker", "--disable-safety-checker", action="store_true")
    gen.add_argument(
        "--prompt_weighting",
        "--prompt-weighting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read (text:1.3) as an emphasis weight (default, as Cog's `prompt_weighting`); "
        "--no-prompt_weighting: brackets are plain text",
    )
    gen.add_argument(
        "--lora_weights", "--lora-weights", help="a LoRA: URL, data URI or path of a trainer .tar or a .safetensors"
    )
    gen.add_argument("--lora_scale", "--lora-scale", type=float, default=1.0, help="LoRA strength, 0-2 (0: base model)")
    _add_fast_mode_argument(
        gen, "an acceleration LoRA of --weights (fast/<name>/) with its sampler, steps and guidance"
    )
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="output file (numbered if several)")
    gen.set_defaults(func=cmd_generate)
    # listed for --help; main() hands every argument after "distill" to the trainer's own parser
    commands.add_parser(
        "distill", help="distil a 4-step LCM-LoRA from a checkpoint (flags: jsd distill --help)", add_help=False
    )
    _add_tokenize_parser(commands)
    _add_filter_parser(commands)
    _add_evaluate_parser(commands)
    _add_playground_parser(commands)
    return parser


def _add_fast_mode_argument(parser: argparse.ArgumentParser, what: str) -> None:
    from jsd.fast_mode import FAST_MODES, OFF

    parser.add_argument("--fast_mode", "--fast-mode", default=OFF, help=f"{what}: one of {', '.join(FAST_MODES)}")


def _fast_generator(weights: Path, device: str | None):
    """An :class:`jsd.serving.ImageGenerator` on ``weights`` with its fast-mode LoRAs (verified, test-loaded)."""
    from jsd import serving

    generator = serving.ImageGenerator(serving.load_pipeline(weights, device=device))
    _set_fast_loras(generator, weights)
    return generator


def _set_fast_loras(generator, weights: Path) -> None:
    """Offer the fast modes installed in ``weights/fast/`` (each verified and test-loaded) to ``generator``."""
    from jsd import fast_mode

    try:
        generator.set_fast_loras(fast_mode.load_fast_loras(weights))
    except fast_mode.FastModeError as err:
        raise CLIError(str(err)) from None


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
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read (text:1.3) as a weight, as `jsd generate` and Cog do by default; --no-prompt_weighting: plain text",
    )
    tok.add_argument("--max_prompt_chunks", "--max-prompt-chunks", type=int, default=3, help="chunks of 77 ids kept")
    tok.set_defaults(func=cmd_tokenize)


def _add_filter_parser(commands) -> None:
    from jsd.clip_filter import DEFAULT_BATCH_SIZE

    flt = commands.add_parser(
        "filter-data",
        help="score image-caption pairs with a Japanese CLIP; list those below --min_clip_score (rinna's recipe)",
    )
    flt.add_argument("data_dir", type=Path, help="image folder with metadata.jsonl, captions.csv or .txt captions")
    flt.add_argument("--min_clip_score", type=float, required=True, help="threshold 0-100: pairs below it are dropped")
    flt.add_argument(
        "--output_dir", type=Path, help="kept/dropped lists, report, histogram (default: DATA_DIR-clip-filter)"
    )
    flt.add_argument("--cache_dir", type=Path, help="score cache, reused by reruns (default: OUTPUT_DIR/cache)")
    _add_scorer_arguments(flt)
    flt.add_argument("--caption_column", default="text", help="the caption's key in metadata.jsonl (default: text)")
    flt.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs scored at once")
    flt.set_defaults(func=cmd_filter_data)


def _add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scorer", type=Path, help="Japanese CLIP folder (default: WEIGHTS/japanese_clip, WEIGHTS = --weights)"
    )
    parser.add_argument(
        "--weights", default=DEFAULT_WEIGHTS, help="checkpoint folder (default: $JSD_WEIGHTS or weights/)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _add_evaluate_parser(commands) -> None:
    ev = commands.add_parser(
        "evaluate", help="one image per held-out prompt at fixed seeds; mean Japanese CLIP score with a 95%% CI"
    )
    _add_scorer_arguments(ev)
    ev.add_argument("--lora_weights", "--lora-weights", help="a LoRA for --weights: .tar, .safetensors, URL")
    ev.add_argument("--lora_scale", "--lora-scale", type=float, default=1.0, help="LoRA strength, 0-2")
    _add_fast_mode_argument(
        ev, "the --weights side in this fast mode (its steps, guidance, scheduler); --compare runs the plain settings"
    )
    ev.add_argument(
        "--compare",
        help="B side: another checkpoint folder (model_index.json), or another LoRA on --weights; "
        "give --weights itself to compare a LoRA with its base model",
    )
    ev.add_argument("--prompts", type=Path, help="UTF-8 file, one prompt per line (default: jsd's 50 held-out prompts)")
    ev.add_argument("--output_dir", type=Path, default=Path("evaluation"), help="report, images, contact sheet")
    ev.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i (default: 0)")
    ev.add_argument("--steps", "--num_inference_steps", dest="num_inference_steps", type=int, default=25)
    ev.add_argument("--guidance_scale", "--guidance-scale", type=float, default=7.5)
    ev.add_argument("--width", type=int, default=512)
    ev.add_argument("--height", type=int, default=512)
    ev.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"one of {', '.join(SCHEDULERS)}")
    ev.add_argument("--negative_prompt", "--negative-prompt", default="")
    ev.add_argument("--font", type=Path, help="a font file that draws Japanese, for the contact sheet's prompts")
    ev.set_defaults(func=cmd_evaluate)


def _process_state(device: str | None):
    """accelerate's view of the processes (one, or those ``accelerate launch`` started) on ``device``."""
    import torch
    from accelerate import PartialState

    # CPU processes need cpu=True, or accelerate looks for GPUs
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


@contextlib.contextmanager
def _shared_work(device: str | None) -> Iterator:
    """The processes' state for the work they share; their process group is closed when the work is done.

    A process that exits with gloo's process group still open can abort in its C++ threads ("terminate called
    without an active exception", SIGABRT: pytorch/pytorch#190489), which fails the whole ``accelerate launch``
    after the work is done. So: all processes meet, then each closes the group (as ``Accelerator.end_training``
    does for the trainer). On an error there is no meeting (the others may never get there), only the closing.
    """
    state = _process_state(device)
    try:
        yield state
    except BaseException:
        state.destroy_process_group()
        raise
    state.wait_for_everyone()
    state.destroy_process_group()


def _scorer_folder(args: argparse.Namespace) -> tuple[Path, str]:
    from jsd.japanese_clip import SCORER_FOLDER, scorer_folder

    if args.scorer is not None:
        return args.scorer, "--scorer"
    return scorer_folder(args.weights), f"--weights {args.weights}: its {SCORER_FOLDER}/"


def cmd_filter_data(args: argparse.Namespace) -> None:
    """Score every pair of DATA_DIR (cached, sharded over processes) and write the kept/dropped lists."""
    from jsd import clip_filter

    output_dir = args.output_dir or args.data_dir.with_name(f"{args.data_dir.name}-clip-filter")
    cache_dir = args.cache_dir or output_dir / clip_filter.CACHE_FOLDER
    try:
        threshold = clip_filter.check_threshold(args.min_clip_score)
        if args.batch_size < 1:
            raise clip_filter.FilterError(f"`--batch_size`={args.batch_size} must be a positive integer.")
        clip_filter.list_pairs(args.data_dir, caption_column=args.caption_column)  # no captions: fail before loading
        folder, name = _scorer_folder(args)
        with _shared_work(args.device) as state:
            scorer = clip_filter.load_scorer(folder, name=name, device=args.device or state.device)
            result = clip_filter.filter_folder(
                args.data_dir,
                scorer,
                threshold,
                cache_dir=cache_dir,
                scorer_id=clip_filter.scorer_fingerprint(folder),
                caption_column=args.caption_column,
                state=state,
                batch_size=args.batch_size,
            )
    except clip_filter.FilterError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:  # every batch scored is already in the cache (appended and fsynced)
        print(
            f"\nInterrupted: the scores computed so far are kept in {cache_dir}; run the same command again to "
            "resume (only the pairs not yet scored are scored).",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    if state.is_main_process:
        extra = {"data_dir": str(args.data_dir), "scorer": str(folder)}
        paths = clip_filter.write_outputs(result, output_dir, extra=extra)
        summary = result.summary()
        print(
            f"{summary['kept']} kept, {summary['dropped']} dropped (score < {threshold:g}), "
            f"{summary['unscorable']} unscorable; {result.scored_now} scored now, {result.from_cache} from the cache"
        )
        for path in paths.values():
            print(f"wrote {path}")
        if not result.kept:
            highest = f"highest score {max(result.scores):.2f}" if result.scores else "no pair could be scored"
            raise CLIError(
                f"`--min_clip_score` {threshold:g} drops every pair of {args.data_dir} ({highest}): lower it; "
                f"{paths['histogram']} shows where the scores lie."
            )


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Generate one image per prompt (per side), score them, and write the report and the contact sheet."""
    from jsd import clip_filter, evaluation, serving
    from jsd.drawing import japanese_font

    settings = evaluation.EvalSettings(
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
    )
    try:  # 1. every input checked before anything is loaded
        prompts = evaluation.read_prompts(args.prompts)
        source = f"`--prompts` {args.prompts}" if args.prompts else f"jsd's {evaluation.DEFAULT_PROMPTS}"
        evaluation.check_requests(prompts, settings, source=source)
        serving.GenerationRequest(lora_scale=args.lora_scale, fast_mode=args.fast_mode).validate()
        evaluation.check_requests(prompts[:1], settings, fast_mode=args.fast_mode)
        font = japanese_font(14, args.font)
        sides = [(_checkpoint_folder(args.weights, "--weights"), args.lora_weights, "--lora_weights", args.fast_mode)]
        if args.compare is not None:
            sides.append(_compare_side(args.compare, sides[0][0]))
        for _, lora, flag, _ in sides:  # fetched and checked now: a bad LoRA costs no generation
            _check_lora(lora, flag)
        scorer_folder, scorer_flag = _scorer_folder(args)
        # 2. the scorer, then each side: generate this process's share of the prompts, score, gather
        with _shared_work(args.device) as state:
            arms = _evaluate_sides(sides, prompts, settings, args, scorer_folder, scorer_flag, state)
    except (evaluation.EvaluationError, clip_filter.FilterError, serving.InputError) as err:
        raise CLIError(str(err)) from None
    except ValueError as err:  # --font
        raise CLIError(str(err)) from None
    # 3. the report, from the main process
    if state.is_main_process:
        report = evaluation.Evaluation(settings, arms)
        paths = evaluation.write_report(report, args.output_dir, font=font)
        print(report.table())
        if args.font and not font.japanese:
            print(
                f"`--font` {args.font} has no Japanese glyphs (it would draw boxes): the contact sheet numbers the "
                "prompts (see report.md); give a Japanese font, e.g. from fc-list :lang=ja."
            )
        elif not font.japanese:
            print("No Japanese font found (fc-list :lang=ja): the contact sheet numbers the prompts (see report.md).")
        for path in paths.values():
            print(f"wrote {path}")


def _evaluate_sides(sides, prompts, settings, args, scorer_folder, scorer_flag, state) -> list:
    """Each side's rows: the scorer, then per side this process's share of the prompts, generated, scored, gathered."""
    from jsd import clip_filter, evaluation

    device = args.device or state.device
    scorer = clip_filter.load_scorer(scorer_folder, name=scorer_flag, device=device)
    arms, generator, loaded = [], None, None
    for weights, lora, flag, fast in sides:
        if weights != loaded:  # another checkpoint: the previous one is released first
            generator = None
            generator = _fast_generator(weights, device)
            generator.pipeline.set_progress_bar_config(disable=True)
            loaded = weights
        generator.set_default_lora(lora, name=flag)  # fetched and test-loaded now: a bad LoRA fails here
        generator.fast_lora(fast)  # installed in these weights, or refused naming fast_mode before generating
        label = _label(weights, lora, args.lora_scale, fast)
        arm = evaluation.Arm(label, generator, lora_scale=args.lora_scale, fast_mode=fast)
        rows = evaluation.evaluate_arm(arm, scorer, prompts, settings, state=state)
        arms.append(evaluation.ArmResult(arm.label, rows))
    return arms


def _checkpoint_folder(value: str | Path, flag: str) -> Path:
    folder = Path(value)
    if not (folder / "model_index.json").is_file():
        raise CLIError(
            f"`{flag}` {folder}: not a checkpoint folder (no model_index.json); run make demo or "
            "scripts/download_weights.py."
        )
    return folder


def _compare_side(value: str, weights: Path) -> tuple[Path, str | None, str, str]:
    """``--compare``: a checkpoint folder (its base model), else a LoRA on ``--weights``; never in fast mode."""
    if Path(value).is_dir():
        return _checkpoint_folder(value, "--compare"), None, "--compare", "off"
    return weights, value, "--compare", "off"


def _check_lora(value: str | None, flag: str) -> None:
    from jsd import lora_weights as lora

    if value:
        try:
            lora.LoraCache().resolve(value, name=flag)
        except lora.LoraError as err:
            raise CLIError(str(err)) from None


def _label(weights: Path, lora: str | None, scale: float, fast: str = "off") -> str:
    label = f"{weights} + LoRA {lora} (scale {scale:g})" if lora else str(weights)
    return label if fast == "off" else f"{label}, fast mode {fast}"


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
    from jsd.japanese_clip import ScorerError

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
        fast_mode=args.fast_mode,
        num_candidates=args.num_candidates,
    )
    weights = Path(args.weights)
    try:
        checked = request.validate()  # before loading anything: a bad input costs nothing
        request.seed = checked.seed
        if not weights.is_dir():
            raise CLIError(f"--weights {weights}: no such folder (run scripts/download_weights.py or make demo)")
        print(f"seed: {checked.seed}")
        pipeline = serving.load_pipeline(weights, device=args.device)
        scorer = serving.load_optional_scorer(weights, device=pipeline.device) if args.num_candidates > 1 else None
        generator = serving.ImageGenerator(pipeline, scorer=scorer)
        _set_fast_loras(generator, weights)
        result = generator.generate(request)
    except (serving.InputError, ScorerError) as err:
        raise CLIError(str(err)) from None
    except serving.GenerationError as err:
        raise CLIError(str(err)) from None
    _save(result, args.output, several=args.num_outputs > 1)


def _output_format(output: Path) -> str:
    suffix = output.suffix.lower().lstrip(".")
    formats = {"png": "png", "webp": "webp", "jpg": "jpg", "jpeg": "jpg"}
    if suffix not in formats:
        raise CLIError(f"-o {output}: the file name must end in .png, .webp or .jpg")
    return formats[suffix]


def _save(result, output: Path, *, several: bool) -> None:
    from jsd.serving import save_image

    output.parent.mkdir(parents=True, exist_ok=True)
    for item in result.images:
        path = output.with_name(f"{output.stem}-{item.index}{output.suffix}") if several else output
        save_image(item.image, path, metadata=item.metadata, quality=result.output_quality)
        print(f"wrote {path} (seed {item.seed})")
    for seed in result.flagged_seeds:
        print(f"the image with seed {seed} was flagged by the safety checker and not saved")
    for candidate in result.candidates:  # best-of-N: every candidate's seed and score
        fate = "chosen" if candidate.chosen else "flagged" if candidate.nsfw else "not chosen"
        score = "no score" if candidate.score is None else f"Japanese CLIP score {candidate.score:.2f}"
        print(f"image {candidate.output} candidate seed {candidate.seed}: {score}, {fate}")


def cmd_distill(argv: list[str]) -> None:
    """``jsd distill FLAGS``: latent consistency distillation through the trainer (diffusers' flag names)."""
    import logging

    from jsd.training.config import DistillConfig, parse_config

    try:
        config = parse_config(argv, DistillConfig, prog="jsd distill")
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    from jsd.training.trainer import train

    train(config)  # the trainer logs where it wrote the LoRA


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["distill"]:  # the trainer's parser owns these flags (one per DistillConfig field)
        try:
            cmd_distill(argv[1:])
        except CLIError as err:
            parser.exit(2, f"jsd: error: {err}\n")
        return
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CLIError as err:
        parser.exit(2, f"jsd: error: {err}\n")
    except KeyboardInterrupt:
        sys.exit(130)
