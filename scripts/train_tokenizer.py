"""Train a Japanese sentencepiece tokenizer with rinna's special-token layout (for stage 1 from scratch).

    .venv/bin/python scripts/train_tokenizer.py --captions data/captions.txt data/images/metadata.jsonl \
        --vocab_size 32000 --output my-tokenizer
    .venv/bin/python scripts/train.py --config configs/train/stage1.json --tokenizer_name my-tokenizer …

A ``.txt`` file holds one caption per line; a ``.jsonl`` file (e.g. ``metadata.jsonl``) one JSON
object per line, whose ``--caption_column`` is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    from jsd.tokenizer_training import CONTROL_SYMBOLS, train_sentencepiece
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

SAMPLE = "富士山の上に浮かぶ赤い風船、水彩画"


def read_captions(paths: list[Path], caption_column: str) -> Iterator[str]:
    """Captions of ``.txt`` (one per line) and ``.jsonl`` files; blank lines and broken JSON lines are skipped."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"`--captions` file {path} does not exist.")
        for line in path.read_text(encoding="utf-8").splitlines():
            if path.suffix == ".jsonl":
                try:
                    line = json.loads(line).get(caption_column, "") if line.strip() else ""
                except (json.JSONDecodeError, AttributeError):
                    continue
            if isinstance(line, str) and line.strip():
                yield line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=Path, nargs="+", required=True, help="Caption files (.txt or .jsonl).")
    parser.add_argument("--vocab_size", type=int, default=32000, help="Pieces at most (rinna: 32000).")
    parser.add_argument("--output", type=Path, required=True, help="Tokenizer folder to write.")
    parser.add_argument("--caption_column", default="text", help="Caption key in .jsonl files.")
    args = parser.parse_args(argv)
    if args.vocab_size < len(CONTROL_SYMBOLS) + 5:
        minimum = len(CONTROL_SYMBOLS) + 5
        print(f"error: `--vocab_size`={args.vocab_size} is too small; use at least {minimum}.", file=sys.stderr)
        return 2
    try:
        tokenizer = train_sentencepiece(
            read_captions(args.captions, args.caption_column), args.output, vocab_size=args.vocab_size
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # sentencepiece's own checks, e.g. fewer pieces than distinct characters
        print(f"error: sentencepiece refused `--vocab_size`={args.vocab_size}: {err}", file=sys.stderr)
        return 2
    sp = tokenizer.sp_model
    print(f"Saved the tokenizer to {args.output}: vocab size {tokenizer.vocab_size}")
    names = ["<unk>", "<s>", "</s>", "[PAD]", *CONTROL_SYMBOLS]
    print("Special ids: " + ", ".join(f"{name}={sp.piece_to_id(name)}" for name in names))
    ids = tokenizer(SAMPLE).input_ids
    print(f"Sample: {SAMPLE} -> {tokenizer.tokenize(SAMPLE)} -> {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
