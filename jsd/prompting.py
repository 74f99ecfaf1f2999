"""Japanese prompt front end: weighting syntax, long prompts in chunks of 77 ids, token reports, embeddings.

A prompt becomes text-encoder input in four steps:

1. with ``prompt_weighting``, the weight syntax ``(text:1.3)`` / ``（テキスト：１．３）`` is parsed out of the
   prompt (:func:`parse_prompt_weights`), leaving the plain text and a weight per character;
2. the plain text is tokenized ONCE, exactly as :class:`~jsd.tokenizer.JapaneseTokenizer` does
   (``str.lower()``, sentencepiece), and each piece takes the weight of the characters it covers;
3. the pieces are cut into chunks of at most 76 (``model_max_length - 1``), preferably before a word
   or after punctuation; each chunk is ``pieces + </s> + [PAD]…`` (77 ids), at most ``max_prompt_chunks``
   of them; what does not fit is reported (:class:`TokenReport`, a logged warning), never silently dropped;
4. each chunk goes through the text encoder on its own, its hidden states are weighted
   (A1111's rule: multiply, then restore the chunk's mean) and the chunks are concatenated along the
   sequence axis: the UNet's cross-attention takes ``77 * k`` tokens.

A prompt of at most 76 pieces, unweighted or with every weight 1.0, gives exactly the ids and the
embeddings of the single 77-id path rinna's pipeline used.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from jsd.tokenizer import SPIECE_FILE, JapaneseTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_CHUNKS = 3
WORD_START = "▁"  # sentencepiece's word-boundary marker
# A chunk may end after a piece ending with one of these, or before a piece starting a word.
_BREAK_AFTER = frozenset("、。，．,.!?！？;；:：・」』】）)]")
_BREAK_LOOKBACK = 20  # pieces to look back for such a boundary (A1111 uses 20 for commas)
_MEAN_TOLERANCE = 0.01  # below this fraction of the mean |value|, a chunk's mean is treated as zero
_OPEN, _CLOSE = "(（", ")）"
_ESCAPE = "\\"
_ESCAPABLE = frozenset("()（）\\")
_NUMBER = r"(?:[0-9０-９]+(?:[.．][0-9０-９]*)?|[.．][0-9０-９]+)"
_WEIGHT_SUFFIX = re.compile(rf"[:：]\s*({_NUMBER})\s*$")


# ---------------------------------------------------------------------------------------- weight syntax
def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """Split ``prompt`` into ``(text, weight)`` runs; the texts joined are the plain prompt.

    ``(text:1.3)`` weights ``text`` by 1.3; brackets, colon and digits may be ASCII or full width
    (``（テキスト：１．３）``); groups nest and their weights multiply. Brackets without a trailing
    ``:number`` are ordinary text (``猫（かわいい）`` stays as it is). ``\\(`` ``\\)`` ``\\（`` ``\\）`` write a
    literal bracket and ``\\\\`` a backslash; any other backslash is text.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}: {prompt!r}.")
    stack = [_Group("")]
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == _ESCAPE and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPABLE:
            stack[-1].add_text(prompt[i + 1])
            i += 2
            continue
        if char in _OPEN:
            stack.append(_Group(char))
        elif char in _CLOSE and len(stack) > 1:
            group = stack.pop()
            stack[-1].add_runs(group.close(char))
        else:
            stack[-1].add_text(char)
        i += 1
    while len(stack) > 1:  # an unclosed bracket is text
        group = stack.pop()
        stack[-1].add_runs(group.close(""))
    return _merge_runs(stack[0].close(None))


class _Group:
    """An open bracket being parsed: finished runs, plus the text typed directly since the last run."""

    def __init__(self, opener: str) -> None:
        self.opener = opener
        self.runs: list[tuple[str, float]] = []
        self.tail: list[str] = []

    def add_text(self, char: str) -> None:
        self.tail.append(char)

    def add_runs(self, runs: list[tuple[str, float]]) -> None:
        self._flush()
        self.runs.extend(runs)

    def _flush(self) -> None:
        if self.tail:
            self.runs.append(("".join(self.tail), 1.0))
            self.tail = []

    def close(self, closer: str | None) -> list[tuple[str, float]]:
        """The runs of this group: weighted if its own text ends with ``:number`` and it is closed."""
        tail = "".join(self.tail)
        match = _WEIGHT_SUFFIX.search(tail) if closer else None
        if match is None:
            self._flush()
            if closer is None:  # the top level
                return self.runs
            return [(self.opener, 1.0), *self.runs, (closer, 1.0)]
        weight = float(unicodedata.normalize("NFKC", match.group(1)))
        self.tail = [tail[: match.start()]]
        self._flush()
        return [(text, w * weight) for text, w in self.runs]


def _merge_runs(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in runs:
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# ---------------------------------------------------------------------------------------- token report
@dataclass(frozen=True)
class TokenReport:
    """How a prompt is tokenized and cut into chunks; ``str(report)`` is a readable summary.

    Attributes:
        prompt: the prompt as given.
        text: the text actually tokenized (the prompt without its weight syntax).
        pieces: every sentencepiece piece of ``text``, truncated ones included (no ``</s>``).
        ids: their ids.
        weights: one weight per piece (1.0 without weighting).
        offsets: ``(start, end)`` of each piece in ``text`` (characters).
        chunk_ranges: ``(start, end)`` piece indices of each chunk that is encoded.
        max_prompt_chunks: the limit the chunks were cut under.
        chunk_length: ids per chunk: pieces, ``</s>`` and ``[PAD]`` (77).
    """

    prompt: str
    text: str
    pieces: tuple[str, ...]
    ids: tuple[int, ...]
    weights: tuple[float, ...]
    offsets: tuple[tuple[int, int], ...]
    chunk_ranges: tuple[tuple[int, int], ...]
    max_prompt_chunks: int
    chunk_length: int

    @property
    def count(self) -> int:
        """Number of pieces in the prompt, truncated ones included."""
        return len(self.ids)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_ranges)

    @property
    def chunks(self) -> list[list[str]]:
        """The pieces of each encoded chunk."""
        return [list(self.pieces[start:end]) for start, end in self.chunk_ranges]

    @property
    def kept(self) -> int:
        """Number of pieces that reach the text encoder."""
        return self.chunk_ranges[-1][1]

    @property
    def truncated(self) -> list[str]:
        """The pieces that did not fit in ``max_prompt_chunks`` chunks (empty if none)."""
        return list(self.pieces[self.kept :])

    @property
    def truncated_text(self) -> str:
        """The part of the (plain) prompt that was dropped, "" if none."""
        return self.text[self.offsets[self.kept][0] :].strip() if self.truncated else ""

    def metrics(self) -> dict[str, int | str]:
        """Counts for logs and Cog metrics, and the dropped text (the playground shows it after a run)."""
        return {
            "prompt_tokens": self.count,
            "prompt_chunks": self.num_chunks,
            "prompt_truncated_tokens": len(self.truncated),
            "prompt_truncated_text": self.truncated_text,
        }

    def __str__(self) -> str:
        capacity = self.chunk_length - 1
        lines = [
            f"prompt: {self.prompt!r}",
            f"{self.count} pieces in {self.num_chunks} chunk(s) "
            f"(each at most {capacity} pieces + </s>, padded to {self.chunk_length}; at most {self.max_prompt_chunks})",
        ]
        if self.text != self.prompt:
            lines.insert(1, f"text: {self.text!r}")
        for k, (start, end) in enumerate(self.chunk_ranges, 1):
            pairs = zip(self.pieces[start:end], self.weights[start:end], strict=True)
            shown = " ".join(_show_piece(piece, weight) for piece, weight in pairs)
            lines.append(f"chunk {k} ({end - start} pieces): {shown}")
        if self.truncated:
            lines.append(f"truncated ({len(self.truncated)} pieces): {self.truncated_text!r}")
        else:
            lines.append("truncated: nothing")
        return "\n".join(lines)

    def chunk_ids(self, index: int, *, eos_token_id: int, pad_token_id: int) -> list[int]:
        """The ids of chunk ``index`` (an empty chunk past the last one): pieces, ``</s>``, ``[PAD]``s."""
        start, end = self.chunk_ranges[index] if index < self.num_chunks else (0, 0)
        ids = [*self.ids[start:end], eos_token_id]
        return ids + [pad_token_id] * (self.chunk_length - len(ids))

    def chunk_weights(self, index: int) -> list[float]:
        """One weight per id of chunk ``index``; ``</s>`` and padding weigh 1.0."""
        start, end = self.chunk_ranges[index] if index < self.num_chunks else (0, 0)
        weights = list(self.weights[start:end])
        return weights + [1.0] * (self.chunk_length - len(weights))


def _show_piece(piece: str, weight: float) -> str:
    return piece if weight == 1.0 else f"{piece}×{weight:g}"


def tokenize_prompt(
    tokenizer: JapaneseTokenizer,
    prompt: str,
    *,
    prompt_weighting: bool = False,
    max_prompt_chunks: int = DEFAULT_MAX_PROMPT_CHUNKS,
) -> TokenReport:
    """Tokenize ``prompt`` once, weight its pieces and cut them into chunks (see the module docstring)."""
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}: {prompt!r}.")
    max_prompt_chunks = check_max_prompt_chunks(max_prompt_chunks)
    runs = parse_prompt_weights(prompt) if prompt_weighting else [(prompt, 1.0)]
    text = "".join(t for t, _ in runs)
    char_weights = [w for t, w in runs for _ in t]
    ids, pieces, offsets = _encode_with_offsets(tokenizer, text)
    weights = [_piece_weight(text, char_weights, span) for span in offsets]
    capacity = tokenizer.model_max_length - 1
    return TokenReport(
        prompt=prompt,
        text=text,
        pieces=tuple(pieces),
        ids=tuple(ids),
        weights=tuple(weights),
        offsets=tuple(offsets),
        chunk_ranges=tuple(_chunk_ranges(pieces, capacity, max_prompt_chunks)),
        max_prompt_chunks=max_prompt_chunks,
        chunk_length=tokenizer.model_max_length,
    )


def tokenize_report(
    prompt: str,
    tokenizer: JapaneseTokenizer | str | os.PathLike | None = None,
    *,
    prompt_weighting: bool = False,
    max_prompt_chunks: int = DEFAULT_MAX_PROMPT_CHUNKS,
) -> TokenReport:
    """The pieces, count, chunks and truncated part of ``prompt``, as the pipelines will encode it.

    Args:
        prompt: the prompt.
        tokenizer: a :class:`~jsd.tokenizer.JapaneseTokenizer`, a ``spiece.model`` file, a tokenizer
            folder or a checkpoint folder holding ``tokenizer/``; default: ``$JSD_WEIGHTS/tokenizer``
            (``weights/tokenizer``).
        prompt_weighting: parse ``(text:1.3)`` weights, as ``prompt_weighting=True`` in the pipelines.
        max_prompt_chunks: chunks of 77 ids kept, as in the pipelines.

    Example::

        >>> print(jsd.tokenize_report("サラリーマン (油絵:1.3)", "weights/", prompt_weighting=True))
    """
    return tokenize_prompt(
        load_tokenizer(tokenizer), prompt, prompt_weighting=prompt_weighting, max_prompt_chunks=max_prompt_chunks
    )


def check_max_prompt_chunks(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`max_prompt_chunks` must be an integer >= 1 (chunks of 77 ids), got {value!r}.")
    return value


def load_tokenizer(source: JapaneseTokenizer | str | os.PathLike | None = None) -> JapaneseTokenizer:
    """A tokenizer from an object, a ``spiece.model`` file, a tokenizer folder or a checkpoint folder."""
    if isinstance(source, JapaneseTokenizer):
        return source
    path = Path(source if source is not None else os.environ.get("JSD_WEIGHTS", "weights"))
    if path.is_file():
        return JapaneseTokenizer(path)
    for folder in (path, path / "tokenizer"):
        if (folder / SPIECE_FILE).is_file():
            return JapaneseTokenizer.from_pretrained(folder)
    given = "no tokenizer was given and there is" if source is None else "there is"
    raise FileNotFoundError(
        f"{given} no tokenizer at {path} (looked for {path / SPIECE_FILE} and {path / 'tokenizer' / SPIECE_FILE}). "
        "Pass a checkpoint folder (--weights DIR), a tokenizer folder or a spiece.model file (--tokenizer PATH)."
    )


def _encode_with_offsets(tokenizer: JapaneseTokenizer, text: str) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Ids, pieces and character spans in ``text`` of the tokenizer's pieces of ``text``."""
    normalized = tokenizer.normalize(text)  # what the tokenizer feeds sentencepiece: str.lower()
    encoded = tokenizer.sp_model.encode(normalized, out_type="offset_mapping")
    # str.lower() may lengthen a character ("İ" → "i̇"): map each normalized character to its source.
    source = [i for i, char in enumerate(text) for _ in range(len(tokenizer.normalize(char)))]
    if len(source) != len(normalized):
        raise RuntimeError(f"Cannot map the lower-cased prompt back to the prompt: {text!r}")
    source.append(len(text))
    spans = [
        (source[begin], source[end - 1] + 1 if end > begin else source[begin]) for begin, end in encoded["offsets"]
    ]
    return list(encoded["ids"]), list(encoded["pieces"]), spans


def _piece_weight(text: str, char_weights: list[float], span: tuple[int, int]) -> float:
    """Mean weight of the non-space characters a piece covers (a zero-width piece: the next character's)."""
    start, end = span
    if start == end:
        return char_weights[min(start, len(text) - 1)]
    covered = [w for c, w in zip(text[start:end], char_weights[start:end], strict=True) if not c.isspace()]
    covered = covered or char_weights[start:end]
    return covered[0] if len(set(covered)) == 1 else sum(covered) / len(covered)


def _chunk_ranges(pieces: Sequence[str], capacity: int, max_chunks: int) -> list[tuple[int, int]]:
    """Piece ranges of the chunks: at most ``capacity`` pieces each, at most ``max_chunks`` of them."""
    ranges, start = [], 0
    while len(pieces) - start > capacity and len(ranges) < max_chunks - 1:
        end = _break_point(pieces, start, start + capacity)
        ranges.append((start, end))
        start = end
    # The last chunk takes a plain ``capacity`` pieces: what follows is truncated anyway.
    ranges.append((start, min(len(pieces), start + capacity)))
    return ranges


def _break_point(pieces: Sequence[str], start: int, limit: int) -> int:
    """The latest index <= ``limit`` that starts a word or follows punctuation, within the look-back."""
    for end in range(limit, max(start, limit - _BREAK_LOOKBACK), -1):
        if pieces[end].startswith(WORD_START) or pieces[end - 1][-1:] in _BREAK_AFTER:
            return end
    return limit


# ---------------------------------------------------------------------------------------- embeddings
def encode_reports(
    tokenizer: JapaneseTokenizer,
    text_encoder: torch.nn.Module,
    reports: Sequence[TokenReport],
    *,
    num_chunks: int,
    device: torch.device | str,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """Weighted hidden states of tokenized prompts, ``(len(reports), num_chunks * 77, hidden)``.

    Prompts with fewer chunks are padded with the encoding of an empty text (``</s>`` + ``[PAD]``s).
    """
    ids = [
        r.chunk_ids(k, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for r in reports
        for k in range(num_chunks)
    ]
    weights = torch.tensor([r.chunk_weights(k) for r in reports for k in range(num_chunks)])
    hidden = run_text_encoder(text_encoder, torch.tensor(ids, device=device), clip_skip=clip_skip)
    hidden = apply_weights(hidden, weights)
    return hidden.reshape(len(reports), num_chunks * hidden.shape[1], hidden.shape[2])


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token's hidden state by its weight, then restore each chunk's mean (A1111's rule).

    Chunks whose weights are all 1.0 are returned untouched, bit for bit. Where a chunk's mean is close
    to zero (within 1% of its mean absolute value) the ratio of means is noise that could blow up or flip
    the sign of the embeddings, so such a chunk is only multiplied.
    """
    rows = (weights != 1.0).any(dim=1).to(hidden.device)
    if not bool(rows.any()):
        return hidden
    chunk = hidden[rows].float()  # float32: fp16 means of 77×768 values lose precision
    weighted = chunk * weights[rows.cpu()].to(chunk.device, torch.float32).unsqueeze(-1)
    before, after = chunk.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    defined = (before.abs() > _MEAN_TOLERANCE * chunk.abs().mean(dim=(1, 2), keepdim=True)) & (
        after.abs() > _MEAN_TOLERANCE * weighted.abs().mean(dim=(1, 2), keepdim=True)
    )
    ratio = torch.where(defined & (before * after > 0), before / after, torch.ones_like(before))
    out = hidden.clone()
    out[rows] = (weighted * ratio).to(hidden.dtype)
    return out


def warn_truncated(report: TokenReport) -> None:
    """Log what a prompt lost to the chunk limit (never dropped silently)."""
    if report.truncated:
        logger.warning(
            "The prompt has %d pieces; %d chunk(s) of %d hold %d, so this part was dropped: %r. "
            "Shorten the prompt or raise `max_prompt_chunks`.",
            report.count,
            report.max_prompt_chunks,
            report.chunk_length - 1,
            report.kept,
            report.truncated_text,
        )


def encode_texts(
    tokenizer: JapaneseTokenizer,
    text_encoder: torch.nn.Module,
    texts: list[str],
    *,
    device: torch.device | str,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """Single-chunk ``last_hidden_state`` of ``texts``, ``(len(texts), 77, hidden)``: rinna's exact path.

    Used where one 77-id sequence per text is required (training); pieces past 76 are dropped, with a warning.
    """
    reports = [tokenize_prompt(tokenizer, t, max_prompt_chunks=1) for t in texts]
    for report in reports:
        warn_truncated(report)
    return encode_reports(tokenizer, text_encoder, reports, num_chunks=1, device=device, clip_skip=clip_skip)


def run_text_encoder(text_encoder: torch.nn.Module, ids: torch.Tensor, *, clip_skip: int | None = None):
    """Hidden states used for cross-attention (diffusers' ``clip_skip`` semantics)."""
    if clip_skip is None:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return text_encoder.text_model.final_layer_norm(hidden)
