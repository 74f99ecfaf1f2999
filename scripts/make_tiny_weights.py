"""Write a tiny (or full-size) seeded checkpoint in the served layout.

.venv/bin/python scripts/make_tiny_weights.py weights/
.venv/bin/python scripts/make_tiny_weights.py /tmp/tiny --tokenizer ../shared/data/tokenizer/google_sp.model
.venv/bin/python scripts/make_tiny_weights.py /tmp/full --size full --dtype float16   # benchmarks only: ~2 GB
.venv/bin/python scripts/make_tiny_weights.py /tmp/tiny --scorer clip   # + a tiny Japanese CLIP in japanese_clip/
"""

from __future__ import annotations

import argparse
import time

try:
    import torch

    from jsd.japanese_clip import scorer_folder
    from jsd.tiny import make_checkpoint, write_tiny_scorer
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", help="folder to write (created)")
    parser.add_argument("--tokenizer", help="sentencepiece model to use (default: train one on jsd's corpus)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsfw", choices=["never", "always"], default="never", help="safety checker flagging")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument(
        "--scorer", choices=["clip", "cloob"], help="also write a tiny Japanese CLIP scorer (best-of-N) of this kind"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dest = make_checkpoint(
        args.dest,
        tokenizer_model=args.tokenizer,
        size=args.size,
        seed=args.seed,
        nsfw=args.nsfw,
        torch_dtype=getattr(torch, args.dtype),
    )
    if args.scorer:
        spiece = args.tokenizer or dest / "tokenizer" / "spiece.model"
        write_tiny_scorer(scorer_folder(dest), kind=args.scorer, seed=args.seed, tokenizer=spiece, size=args.size)
    print(f"wrote {args.size} checkpoint (seed {args.seed}) to {dest} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
