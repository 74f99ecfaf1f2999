"""Train a sentencepiece model with rinna's special-token layout.

rinna's ``google_sp.model``: unigram, ``nmt_nfkc``, no byte fallback, and the ids
``<unk>=0, <s>=1, </s>=2, [PAD]=3, [CLS]=4, [SEP]=5, [MASK]=6`` (all but ``<unk>`` control symbols,
so raw text can never produce them). Models trained here keep that layout, so the tokenizer, the
text encoder's config and the pipelines work unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from jsd.tokenizer import SPIECE_FILE, JapaneseTokenizer

CONTROL_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")


def train_sentencepiece(texts: Iterable[str], output_dir: str | Path, *, vocab_size: int) -> JapaneseTokenizer:
    """Train on ``texts`` (lower-cased, as the tokenizer will see them) and save a tokenizer folder.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces instead of failing.
    Training is single-threaded, so the same texts always give the same model.
    """
    lines = [t.strip().lower() for t in texts if t.strip()]
    if not lines:
        raise ValueError("No text to train the tokenizer on: every caption was empty.")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        byte_fallback=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="[PAD]",
        control_symbols=list(CONTROL_SYMBOLS),
        num_threads=1,
        minloglevel=2,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SPIECE_FILE).write_bytes(model.getvalue())
    tokenizer = JapaneseTokenizer(output_dir / SPIECE_FILE)
    tokenizer.save_pretrained(output_dir)
    return tokenizer
