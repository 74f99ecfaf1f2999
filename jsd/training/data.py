"""Training data: an image folder with ``metadata.jsonl`` or WebDataset tar shards, streamed.

Both sources are read as one deterministic, resumable stream per data-loading worker:

* records are split between all workers of all processes (whole shards when there are enough of
  them, otherwise every n-th record), in an order seeded per epoch;
* each batch carries the stream position after its last record, so a resumed run restarts every
  worker exactly where the interrupted one stopped, without reading the skipped images;
* the stream is endless (epoch after epoch), so all processes always take the same number of steps;
* a bad record (missing or unreadable image, empty caption, broken metadata line or shard) is
  skipped, and reported with the next batch so that the training loop can count it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import re
import signal
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jsd.captions import IMAGE_EXTENSIONS, METADATA_FILE

CAPTION_EXTENSIONS = ("txt", "json")
MAX_BAD_EXAMPLES = 20  # a few named examples in the report; the counts are complete


class BadRecord(Exception):
    """A record that cannot be trained on; the message says why."""


Fetch = Callable[[], tuple[bytes, object]]  # -> (image bytes, caption)


@dataclass(frozen=True)
class Position:
    """Where a worker's stream goes on: epoch, shard (index in this worker's list), next record in it."""

    epoch: int = 0
    shard: int = 0
    record: int = 0


@dataclass
class BadRecords:
    """Skipped records of one process: counts per reason, and the first few by name."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(f"{key}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.examples = Counter(state["counts"]), list(state["examples"])

    @classmethod
    def merged(cls, states: list[dict]) -> BadRecords:
        out = cls()
        for state in states:
            out.counts.update(state["counts"])
            out.examples.extend(state["examples"][: MAX_BAD_EXAMPLES - len(out.examples)])
        return out

    def summary(self) -> str:
        if not self.total:
            return "0 bad records skipped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"{self.total} bad records skipped ({reasons}); e.g. {'; '.join(self.examples[:5])}"


# ---------------------------------------------------------------------------------------- sources
class ImageFolderSource:
    """An image folder with ``metadata.jsonl``: one JSON object per line with ``file_name`` and the caption.

    The folder is one "shard" whose records are shuffled per epoch; images are read lazily, so
    records of other workers, or skipped on resume, cost nothing.
    """

    def __init__(self, folder: str | Path, *, caption_column: str = "text") -> None:
        self.folder = Path(folder)
        metadata = self.folder / METADATA_FILE
        if not metadata.is_file():
            raise FileNotFoundError(
                f"`--train_data_dir` {self.folder} has no {METADATA_FILE}: expected one JSON object per line "
                f'such as {{"file_name": "0001.jpg", "{caption_column}": "…"}}.'
            )
        self.caption_column = caption_column
        self.lines = [line for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.lines:
            raise ValueError(f"{metadata} lists no images.")

    @property
    def num_shards(self) -> int:
        return 1

    @property
    def num_records(self) -> int:
        return len(self.lines)

    def only(self, file_names: set[str], *, normalize: Callable[[str], str] = str) -> ImageFolderSource:
        """A copy holding only the lines whose ``normalize(file_name)`` is in ``file_names`` (a data filter's)."""

        def keep(line: str) -> bool:
            try:
                name = json.loads(line)["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return False
            return isinstance(name, str) and normalize(name) in file_names

        subset = copy.copy(self)
        subset.lines = [line for line in self.lines if keep(line)]
        return subset

    def records(self, shard: int, epoch: int, seed: int) -> Iterator[tuple[str, Fetch]]:
        for i in epoch_permutation(len(self.lines), seed=seed, epoch=epoch):
            yield from self._record(i)

    def _record(self, i: int) -> Iterator[tuple[str, Fetch]]:
        line = self.lines[i]
        try:
            entry = json.loads(line)
            name = entry["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            yield f"{METADATA_FILE} line {i + 1}", _raise(BadRecord(f"invalid metadata line {line[:80]!r}"))
            return
        if not isinstance(name, str):
            reason = f"invalid metadata line (`file_name` {name!r} is not a string) {line[:80]!r}"
            yield f"{METADATA_FILE} line {i + 1}", _raise(BadRecord(reason))
            return

        def fetch() -> tuple[bytes, object]:
            path = self.folder / name
            if not path.is_file():
                raise BadRecord("missing image file")
            try:
                data = path.read_bytes()
            except OSError as err:  # permissions, I/O errors, a file gone since is_file()
                raise BadRecord(f"unreadable image file ({type(err).__name__})") from err
            return data, entry.get(self.caption_column)

        yield str(name), fetch


class TarShardSource:
    """WebDataset tar shards: files grouped by key (``0001.jpg`` + ``0001.txt``), read as a stream.

    A caption is ``KEY.txt``, or the ``caption_column`` (or ``caption``) of ``KEY.json``.
    ``pipe:CMD`` reads a shard from a command's output (e.g. ``pipe:aws s3 cp s3://b/shard-0.tar -``).
    """

    def __init__(self, patterns: list[str], *, caption_column: str = "text") -> None:
        self.shards = [url for pattern in patterns for url in expand_braces(pattern)]
        if not self.shards:
            raise ValueError(f"`--train_shards` {patterns!r} names no shard.")
        missing = [s for s in self.shards if not s.startswith("pipe:") and not Path(s).is_file()]
        if len(missing) == len(self.shards):
            raise FileNotFoundError(f"None of the {len(self.shards)} `--train_shards` exists, e.g. {missing[0]}.")
        self.caption_column = caption_column

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_records(self) -> None:
        return None

    def shard_order(self, epoch: int, seed: int) -> list[int]:
        return epoch_permutation(len(self.shards), seed=seed, epoch=epoch)

    def records(self, shard: int, epoch: int, seed: int) -> Iterator[tuple[str, Fetch]]:
        url = self.shards[shard]
        try:
            with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                yield from self._group(tar, url)
        except (OSError, tarfile.TarError, EOFError) as err:
            yield f"{url}", _raise(BadRecord(f"unreadable shard ({type(err).__name__}: {err})"))

    def _group(self, tar: tarfile.TarFile, url: str) -> Iterator[tuple[str, Fetch]]:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            member_key = f"{member.name.rpartition('/')[0]}/{stem}".lstrip("/")
            if member_key != key and key is not None:
                yield f"{url}:{key}", self._fetch(files)
                files = {}
            key = member_key
            files[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield f"{url}:{key}", self._fetch(files)

    def _fetch(self, files: dict[str, bytes]) -> Fetch:
        def fetch() -> tuple[bytes, object]:
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is None:
                raise BadRecord(f"no image (files: {sorted(files)})")
            if "txt" in files:
                return image, files["txt"].decode("utf-8", errors="replace")
            if "json" in files:
                try:
                    meta = json.loads(files["json"])
                except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
                    raise BadRecord(f"invalid json ({err})") from err
                if not isinstance(meta, dict):
                    raise BadRecord(f"invalid json (a {type(meta).__name__}, not an object)")
                return image, meta.get(self.caption_column, meta.get("caption"))
            raise BadRecord("no caption (.txt or .json)")

        return fetch


def epoch_permutation(n: int, *, seed: int, epoch: int) -> list[int]:
    """The order of an epoch: the same for every process and every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _raise(err: Exception) -> Fetch:
    def fetch() -> tuple[bytes, object]:
        raise err

    return fetch


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator[BinaryIO]:
    if not url.startswith("pipe:"):
        with open(url, "rb") as f:
            yield f
        return
    proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # the user's own command
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() not in (0, -signal.SIGPIPE):  # SIGPIPE: we stopped reading early
            raise OSError(f"`{url[5:]}` exited with status {proc.returncode}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``{000..099}`` (zero padding kept) and ``{a,b}``, nested left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    if numeric := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = numeric.groups()
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


# ---------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, resolution: int, *, flip: bool) -> torch.Tensor:
    """RGB image → ``(3, resolution, resolution)`` in [-1, 1]: shorter side resized, center-cropped."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadRecord(f"unreadable image ({type(err).__name__})") from err
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def clean_caption(caption: object) -> str:
    if isinstance(caption, list):  # the datasets convention allows several captions: take the first
        caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord("empty caption")
    return caption.strip()


# ---------------------------------------------------------------------------------------- the stream
class RecordStream(IterableDataset):
    """Endless, resumable stream of ``{"pixel_values", "text"}`` samples for one process.

    Args:
        source: an :class:`ImageFolderSource` or :class:`TarShardSource`.
        rank, world_size: this process and the number of processes.
        num_workers: DataLoader workers per process (0 counts as one stream).
    """

    def __init__(
        self, source, *, resolution: int, random_flip: bool, seed: int, rank: int, world_size: int, num_workers: int
    ) -> None:
        self.source, self.resolution, self.random_flip, self.seed = source, resolution, random_flip, seed
        self.rank, self.world_size, self.streams = rank, world_size, max(num_workers, 1)
        total = world_size * self.streams
        if source.num_shards == 1 and source.num_records is not None and source.num_records < total:
            raise ValueError(
                f"The training data has {source.num_records} records, fewer than the {total} streams reading it "
                f"({world_size} processes × {self.streams}): lower `--dataloader_num_workers` or add data."
            )
        self.start: dict[int, Position] = {}
        # DataLoader takes batches from its workers in turn, starting with worker 0; a resumed run
        # renumbers the workers so that the stream due next is served first.
        self.rotation = 0

    def resume(self, positions: dict[int, Position], batches_done: int) -> None:
        self.start, self.rotation = dict(positions), batches_done % self.streams

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.rotation) % self.streams
        yield from self._samples(stream, self.start.get(stream, Position()))

    def _samples(self, stream: int, start: Position) -> Iterator[dict]:
        total, me = self.world_size * self.streams, self.rank * self.streams + stream
        whole_shards = self.source.num_shards >= total
        bad: list[tuple[str, str]] = []
        epoch = start.epoch
        while True:
            found = False
            shards = self._shard_order(epoch)
            mine = shards[me::total] if whole_shards else shards
            first = start.shard if epoch == start.epoch else 0
            for s in range(first, len(mine)):
                skip = start.record if (epoch, s) == (start.epoch, start.shard) else 0
                for r, (key, fetch) in enumerate(self.source.records(mine[s], epoch, self.seed)):
                    if r < skip or (not whole_shards and r % total != me):
                        continue
                    try:
                        sample = self._decode(key, fetch, epoch)
                    except BadRecord as err:
                        bad.append((key, str(err)))
                        continue
                    found = True
                    yield sample | {"stream": stream, "position": Position(epoch, s, r + 1), "bad": bad}
                    bad = []
            if not found and epoch > start.epoch:
                raise RuntimeError(f"Stream {me} of the training data found no usable record in a whole epoch.")
            epoch += 1

    def _shard_order(self, epoch: int) -> list[int]:
        if self.source.num_shards == 1:
            return [0]
        return self.source.shard_order(epoch, self.seed)

    def _decode(self, key: str, fetch: Fetch, epoch: int) -> dict:
        data, caption = fetch()
        text = clean_caption(caption)
        flip = self.random_flip and random.Random(f"{self.seed}:{epoch}:{key}").random() < 0.5
        return {"pixel_values": decode_image(data, self.resolution, flip=flip), "text": text}


def collate(samples: list[dict]) -> dict:
    """A batch from one worker: images, captions, the stream position after it and the records skipped."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "text": [s["text"] for s in samples],
        "stream": samples[-1]["stream"],
        "position": samples[-1]["position"],
        "bad": [b for s in samples for b in s["bad"]],
    }


def make_source(*, train_data_dir: str | None, train_shards: list[str], caption_column: str):
    if train_data_dir:
        return ImageFolderSource(train_data_dir, caption_column=caption_column)
    return TarShardSource(train_shards, caption_column=caption_column)


def make_dataloader(stream: RecordStream, *, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
