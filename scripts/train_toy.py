"""Train the toy checkpoint from scratch with jsd's own recipe (docs/toy-world.md); over an hour on 2 cores.

Run again, it goes on where it stopped (the finished steps are in WORK/progress.json).

    .venv/bin/python scripts/train_toy.py                 # → toy/weights/ and toy/training-log.json
    .venv/bin/python scripts/train_toy.py --work /tmp/toy --dest /tmp/toy/weights   # elsewhere

Deterministic from --seed. The steps (data, VAE, the stages of scripts/train.py) are in jsd/toyworld/build.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

try:
    import torch

    from jsd.japanese_clip import SCORER_FOLDER, TOKENIZER_SUBFOLDER
    from jsd.tokenizer import SPIECE_FILE, copy_notice
    from jsd.toyworld import TOY_WEIGHTS
    from jsd.toyworld.build import Plan, build
    from jsd.toyworld.clip import build_scorer
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", default="build/toy", help="data, start checkpoint and stage runs (default: %(default)s)"
    )
    parser.add_argument("--dest", default=str(TOY_WEIGHTS), help="the served toy checkpoint (default: %(default)s)")
    parser.add_argument(
        "--tokenizer",
        default=str(REPO.parent / "shared" / "data" / "tokenizer" / "google_sp.model"),
        help="rinna's sentencepiece model (default: ../shared's); the committed toy checkpoint carries a copy",
    )
    parser.add_argument("--steps_scale", type=float, default=1.0, help="multiply every step count (0.01: a smoke test)")
    parser.add_argument("--scorer_steps", type=int, default=2000, help="steps of the toy Japanese CLIP (default: 2000)")
    parser.add_argument("--scorer_only", action="store_true", help="only (re)train the toy CLIP into --dest")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: torch's; 1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the stages' subprocesses too
        torch.set_num_threads(args.threads)
    tokenizer = find_tokenizer(Path(args.tokenizer), REPO)
    if tokenizer is None:
        print(f"error: `--tokenizer` {args.tokenizer} does not exist (rinna's google_sp.model)", file=sys.stderr)
        return 2
    if tokenizer != Path(args.tokenizer):
        print(f"`--tokenizer` {args.tokenizer} does not exist: using the committed copy {tokenizer}", flush=True)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    work, dest = Path(args.work).resolve(), Path(args.dest).resolve()
    tokenizer = stage_tokenizer(tokenizer, work)  # a committed copy lies in the --dest that the build replaces
    if not args.scorer_only:
        build(
            REPO,
            work,
            dest,
            tokenizer,
            Plan(seed=args.seed).scaled(args.steps_scale),
            train_script=REPO / "scripts" / "train.py",
            progress=progress,
        )
        progress(f"wrote {args.dest} and its training log")
    log = build_scorer(
        REPO,
        work,
        dest,
        tokenizer,
        steps=args.scorer_steps,
        seed=args.seed,
        convert_script=REPO / "scripts" / "download_weights.py",
        progress=progress,
    )
    (dest.parent / "scorer-log.json").write_text(json.dumps(log) + "\n", encoding="utf-8")
    progress(f"wrote the toy Japanese CLIP to {dest / 'japanese_clip'} and {dest.parent / 'scorer-log.json'}")
    return 0


def find_tokenizer(given: Path, repo: Path) -> Path | None:
    """``given`` if it exists, else a committed copy of rinna's sentencepiece model in ``repo``, else None.

    The toy checkpoint's tokenizer is the first choice; the toy Japanese CLIP's (committed on its own) the
    second, so a clone without ``../shared`` can still build the toy."""
    checkpoint_copy = repo / TOY_WEIGHTS / "tokenizer" / SPIECE_FILE  # the served layout's tokenizer/ folder
    clip_copy = repo / TOY_WEIGHTS / SCORER_FOLDER / TOKENIZER_SUBFOLDER / SPIECE_FILE
    return next((path for path in (given, checkpoint_copy, clip_copy) if path.is_file()), None)


def stage_tokenizer(model: Path, work: Path) -> Path:
    """A copy of the sentencepiece ``model`` (and the NOTICE beside it) in ``work``, which the build never replaces."""
    folder = work / "rinna-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / model.name)
    copy_notice(model, folder)
    return folder / model.name


if __name__ == "__main__":
    sys.exit(main())
