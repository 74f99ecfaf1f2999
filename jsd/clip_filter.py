"""The seed recipe's data filter: drop image–caption pairs that a Japanese CLIP scores below a threshold.

rinna cleaned Japanese Stable Diffusion's training data this way (pairs scored below a threshold by
their Japanese CLOOB were removed). Here::

    .venv/bin/python -m jsd filter-data data/images --min_clip_score 20             # one process
    .venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m jsd filter-data data/images --min_clip_score 20       # two (CPU or GPUs)
    .venv/bin/python scripts/train.py … --train_data_dir data/images --min_clip_score 20   # before training

What it guarantees:

- the pairs are read as the trainer reads them (:mod:`jsd.captions`: ``metadata.jsonl`` > ``captions.csv`` > ``.txt``
  sidecars); a pair whose score is below ``min_clip_score`` is dropped, one at or above it is kept;
- every pair ends in exactly one list: kept, dropped (both with their scores) or unscorable (with why);
- scores are cached by image SHA-256, caption and scorer, appended to the cache after every batch; an
  interrupted run loses nothing already scored and a rerun scores only what is missing;
- with several processes (``accelerate launch``) each scores every n-th batch and the results are gathered:
  the lists and scores are the same as with one process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from jsd.captions import IMAGE_EXTENSIONS, DatasetError, read_captions

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
KEPT_FILE, DROPPED_FILE, REPORT_FILE, HISTOGRAM_FILE = "kept.jsonl", "dropped.jsonl", "report.json", "histogram.png"
CACHE_FOLDER = "cache"
MAX_SCORE = 100.0  # a CLIP score is 100 × max(cos, 0)


class FilterError(ValueError):
    """The data or a setting cannot be used; the message names it and says what is allowed."""


# ---------------------------------------------------------------------------------------- inputs
def check_threshold(value: object, name: str = "--min_clip_score") -> float:
    """``value`` as a float within [0, 100], or :class:`FilterError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FilterError(f"`{name}` must be a number from 0 to {MAX_SCORE:g}, got {value!r}.")
    if not 0.0 <= value <= MAX_SCORE:
        raise FilterError(
            f"`{name}`={value:g} is outside 0-{MAX_SCORE:g}: a Japanese CLIP score is 100 × max(cosine, 0)."
        )
    return float(value)


def load_scorer(folder: str | os.PathLike, *, name: str, device=None):
    """The Japanese CLIP scorer in ``folder``; a missing or damaged one is a :class:`FilterError` naming ``name``."""
    from jsd.japanese_clip import JapaneseCLIPScorer, ScorerError

    folder = Path(folder)
    if not folder.is_dir():
        raise FilterError(
            f"`{name}` {folder}: no Japanese CLIP scorer there (no such folder). Fetch one with "
            "scripts/download_weights.py (see docs/japanese-clip.md), or point to its folder."
        )
    try:
        return JapaneseCLIPScorer.from_pretrained(folder, device=device)
    except (ScorerError, OSError, ValueError) as err:
        raise FilterError(f"`{name}` {folder}: the Japanese CLIP scorer cannot be loaded: {err}") from None


def scorer_fingerprint(folder: str | os.PathLike) -> str:
    """Identifies a scorer's weights for the cache: its manifest's hash, else its files' names, sizes and times."""
    folder = Path(folder)
    digest = hashlib.sha256()
    manifest = folder / "manifest.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Pair:
    """An image (path relative to the data folder, ``/``-separated) and its caption."""

    file_name: str
    text: str


@dataclass
class Listing:
    """The pairs of a data folder, where their captions came from, and the entries that are no pair."""

    caption_source: str
    pairs: list[Pair]
    skipped: dict[str, str] = field(default_factory=dict)  # entry → reason


def list_pairs(folder: str | os.PathLike, *, caption_column: str = "text", name: str = "data_dir") -> Listing:
    """Read the pairs of an image folder as the trainer does: ``metadata.jsonl`` > ``captions.csv`` > ``.txt``.

    Raises :class:`FilterError` naming ``name`` and the folder when it holds no image or no caption.
    """
    root = Path(folder)
    label = f"`{name}` {root}"
    if not root.is_dir():
        raise FilterError(f"{label}: no such folder.")
    images = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    if not images:
        raise FilterError(f"{label} holds no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}).")
    try:
        source, captions, skipped = read_captions(root, images, label=label, caption_column=caption_column)
    except DatasetError as err:
        raise FilterError(str(err)) from None
    pairs = []
    for image in images:
        caption = captions.pop(image, None)
        if caption is None:
            skipped[image] = f"no caption ({source})"
        elif not caption:
            skipped[image] = "empty caption"
        else:
            pairs.append(Pair(image, caption))
    skipped |= {entry: "missing image file" for entry in captions}  # captions naming no image in the folder
    if not pairs:
        examples = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise FilterError(f"{label}: none of its {len(images)} image(s) has a caption in {source} ({examples}).")
    return Listing(source, pairs, skipped)


# ---------------------------------------------------------------------------------------- the cache
class ScoreCache:
    """Scores already computed, by image SHA-256, caption and scorer: JSON lines in ``folder``.

    Each process appends to its own file, one ``write`` + ``fsync`` per batch, so a killed run keeps every
    batch it finished; a line cut short by the kill is ignored when the cache is read again.
    """

    def __init__(self, folder: str | os.PathLike, scorer_id: str, *, writer: str = "0") -> None:
        self.folder, self.scorer_id = Path(folder), scorer_id
        self.path = self.folder / f"scores-{writer}.jsonl"
        self.scores: dict[tuple[str, str], float] = {}
        self.torn_lines = 0
        for file in sorted(self.folder.glob("scores-*.jsonl")):
            self._read(file)

    def _read(self, file: Path) -> None:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if entry["scorer"] == self.scorer_id:
                    self.scores[entry["image_sha256"], entry["text"]] = float(entry["clip_score"])
            except (ValueError, KeyError, TypeError):
                self.torn_lines += 1

    def get(self, image_sha256: str, text: str) -> float | None:
        return self.scores.get((image_sha256, text))

    def add(self, entries: Sequence[tuple[str, str, float]]) -> None:
        """Append ``(image_sha256, text, score)`` entries durably, in one write."""
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps({"image_sha256": h, "text": t, "scorer": self.scorer_id, "clip_score": s}, ensure_ascii=False)
            + "\n"
            for h, t, s in entries
        )
        with open(self.path, "a+b") as f:
            # a line cut by an earlier kill has no newline: end it, or it would swallow our first line
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                lines = "\n" + lines
            f.write(lines.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.scores.update({(h, t): s for h, t, s in entries})


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class PairScore:
    """What became of one pair: its score (and whether it came from the cache), or why it has none."""

    index: int
    score: float | None
    cached: bool = False
    error: str | None = None


def score_pairs(
    folder: str | os.PathLike,
    pairs: Sequence[Pair],
    scorer,
    cache: ScoreCache,
    *,
    state=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[PairScore]:
    """Score every pair, gathered in pair order.

    ``state``: accelerate's ``PartialState`` (or ``Accelerator``) when several processes share the work
    (``None``: one). The pairs are cut into batches of ``batch_size``; batch ``k`` is scored by process
    ``k % num_processes``, whole, so a score does not depend on the number of processes. Each batch is in
    the cache before the next starts.
    """
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = list(_chunks(list(range(len(pairs))), batch_size))[rank::world]
    show = state is None or state.is_local_main_process
    outcomes = []
    with tqdm(total=sum(map(len, mine)), desc="Japanese CLIP scores", unit="pair", disable=not show) as progress:
        for chunk in mine:
            outcomes += _score_chunk(Path(folder), pairs, chunk, scorer, cache, batch_size)
            progress.update(len(chunk))
    if world > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object(outcomes)
    return sorted(outcomes, key=lambda o: o.index)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _score_chunk(root: Path, pairs, chunk: list[int], scorer, cache: ScoreCache, batch_size: int) -> list[PairScore]:
    outcomes, todo = [], []  # todo: (index, sha256, image)
    for i in chunk:
        pair = pairs[i]
        try:
            data = (root / pair.file_name).read_bytes()
        except OSError as err:
            outcomes.append(PairScore(i, None, error=f"unreadable image file ({type(err).__name__})"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        cached = cache.get(digest, pair.text)
        if cached is not None:
            outcomes.append(PairScore(i, cached, cached=True))
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                todo.append((i, digest, image.convert("RGB")))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            outcomes.append(PairScore(i, None, error=f"unreadable image ({type(err).__name__})"))
    if todo:
        texts = [pairs[i].text for i, _, _ in todo]
        scores = scorer.score([image for _, _, image in todo], texts, batch_size=batch_size).tolist()
        cache.add([(digest, text, score) for (_, digest, _), text, score in zip(todo, texts, scores, strict=True)])
        outcomes += [PairScore(i, score) for (i, _, _), score in zip(todo, scores, strict=True)]
    return outcomes


# ---------------------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class ScoredPair:
    file_name: str
    text: str
    clip_score: float


@dataclass
class FilterResult:
    """Kept (score >= threshold) and dropped (below) pairs with their scores, and the pairs with no score."""

    threshold: float
    caption_source: str
    kept: list[ScoredPair]
    dropped: list[ScoredPair]
    unscorable: dict[str, str]  # file or metadata entry → why it has no score
    scored_now: int
    from_cache: int

    @property
    def scores(self) -> list[float]:
        return [p.clip_score for p in (*self.kept, *self.dropped)]

    def summary(self) -> dict:
        """Counts and score statistics (no pair lists)."""
        scores = self.scores
        stats = {}
        if scores:
            stats = {
                "mean": round(statistics.fmean(scores), 4),
                "median": round(statistics.median(scores), 4),
                "min": round(min(scores), 4),
                "max": round(max(scores), 4),
            }
        return {
            "min_clip_score": self.threshold,
            "caption_source": self.caption_source,
            "pairs_scored": len(scores),
            "kept": len(self.kept),
            "dropped": len(self.dropped),
            "unscorable": len(self.unscorable),
            "scored_now": self.scored_now,
            "from_cache": self.from_cache,
            "scores": stats,
        }

    def to_json(self) -> dict:
        """The summary, every dropped pair with its score, and every unscorable entry with why."""
        return self.summary() | {
            "dropped_pairs": [asdict(p) for p in self.dropped],
            "unscorable_entries": dict(self.unscorable),
        }

    def log(self) -> None:
        s = self.summary()
        logger.info(
            "Japanese CLIP filter (min_clip_score %g): %d kept, %d dropped, %d unscorable; %d scored now, %d cached",
            self.threshold,
            s["kept"],
            s["dropped"],
            s["unscorable"],
            self.scored_now,
            self.from_cache,
        )


def split_by_threshold(listing: Listing, outcomes: Sequence[PairScore], threshold: float) -> FilterResult:
    """Kept: score >= ``threshold``; dropped: below it; pairs without a score join the listing's skipped entries."""
    kept, dropped, unscorable = [], [], dict(listing.skipped)
    for outcome in outcomes:
        pair = listing.pairs[outcome.index]
        if outcome.score is None:
            unscorable[pair.file_name] = outcome.error or "no score"
            continue
        scored = ScoredPair(pair.file_name, pair.text, round(outcome.score, 6))
        (kept if outcome.score >= threshold else dropped).append(scored)
    return FilterResult(
        threshold=threshold,
        caption_source=listing.caption_source,
        kept=kept,
        dropped=dropped,
        unscorable=unscorable,
        scored_now=sum(o.score is not None and not o.cached for o in outcomes),
        from_cache=sum(o.cached for o in outcomes),
    )


def filter_folder(
    folder: str | os.PathLike,
    scorer,
    threshold: float,
    *,
    cache_dir: str | os.PathLike,
    scorer_id: str,
    caption_column: str = "text",
    name: str = "data_dir",
    state=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> FilterResult:
    """List the pairs of ``folder``, score them (cached, sharded over ``state``'s processes) and split them."""
    threshold = check_threshold(threshold)
    listing = list_pairs(folder, caption_column=caption_column, name=name)
    writer = str(state.process_index) if state is not None else "0"
    cache = ScoreCache(cache_dir, scorer_id, writer=writer)
    if cache.torn_lines:
        logger.warning("%s: %d cache line(s) cut short by an interrupted run were ignored", cache_dir, cache.torn_lines)
    outcomes = score_pairs(folder, listing.pairs, scorer, cache, state=state, batch_size=batch_size)
    return split_by_threshold(listing, outcomes, threshold)


def write_outputs(result: FilterResult, output_dir: str | os.PathLike, *, extra: dict | None = None) -> dict[str, Path]:
    """``kept.jsonl`` (a ``metadata.jsonl`` for training, with scores), ``dropped.jsonl``, ``report.json``,
    ``histogram.png``; each written to a temporary name first, then renamed."""
    from jsd.drawing import score_histogram

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file for name, file in (("kept", KEPT_FILE), ("dropped", DROPPED_FILE))}
    for name, pairs in (("kept", result.kept), ("dropped", result.dropped)):
        lines = "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs)
        _write_atomically(paths[name], lines.encode("utf-8"))
    report = (extra or {}) | result.to_json()
    paths["report"] = out / REPORT_FILE
    _write_atomically(paths["report"], (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    paths["histogram"] = out / HISTOGRAM_FILE
    buffer = io.BytesIO()
    score_histogram(result.scores, result.threshold).save(buffer, format="PNG")
    _write_atomically(paths["histogram"], buffer.getvalue())
    return paths


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def normal_name(name: str) -> str:
    """A metadata ``file_name`` as :func:`list_pairs` names it (``/``-separated, no ``.`` parts)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return PurePosixPath(*[p for p in parts if p not in ("", ".")]).as_posix()
