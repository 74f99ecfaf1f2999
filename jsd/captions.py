"""Image captions of a training folder, read the one way the trainer and the CLIP filter both read them (no torch).

Captions come from the first of these found in the folder:

1. ``metadata.jsonl`` — one JSON object per line, ``{"file_name": "0001.png", "text": "…"}``;
2. ``captions.csv`` — columns ``file_name`` and ``caption`` (UTF-8, with or without a BOM);
3. a ``.txt`` file per image with the same name (``0001.png`` + ``0001.txt``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath

METADATA_FILE = "metadata.jsonl"
CAPTIONS_CSV = "captions.csv"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class DatasetError(ValueError):
    """The images cannot be trained on; the message names the input (``input_images``), the file and why."""


def read_captions(
    root: Path, images: list[str], *, label: str, caption_column: str = "text"
) -> tuple[str, dict[str, str], dict[str, str]]:
    """``(source, {image: caption}, {skipped entry: reason})`` from the first caption source present.

    ``caption_column``: the caption's key in ``metadata.jsonl`` (the trainer's ``--caption_column``).
    """
    if (root / METADATA_FILE).is_file():
        return METADATA_FILE, *_metadata_captions(root / METADATA_FILE, label=label, caption_column=caption_column)
    if (root / CAPTIONS_CSV).is_file():
        return CAPTIONS_CSV, *_csv_captions(root / CAPTIONS_CSV, label=label)
    captions = {}
    for image in images:
        text_file = (root / image).with_suffix(".txt")
        if text_file.is_file():
            captions[image] = text_file.read_text(encoding="utf-8", errors="replace").strip()
    if not captions:
        raise DatasetError(
            f"{label}: none of its {len(images)} image(s) has a caption. Add {METADATA_FILE} "
            f'({{"file_name": "0001.png", "text": "…"}} per line), {CAPTIONS_CSV} (columns file_name, caption) '
            "or a .txt file per image (0001.txt for 0001.png)."
        )
    return "txt", captions, {}


def _metadata_captions(
    path: Path, *, label: str, caption_column: str = "text"
) -> tuple[dict[str, str], dict[str, str]]:
    captions, skipped = {}, {}
    lines = _read_text(path, label=label).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file_name, text = entry["file_name"], entry[caption_column]
        except (ValueError, KeyError, TypeError):
            skipped[f"{METADATA_FILE} line {number}"] = f"not a JSON object with file_name and {caption_column}"
            continue
        if not isinstance(file_name, str) or not isinstance(text, str):
            skipped[f"{METADATA_FILE} line {number}"] = f"file_name and {caption_column} must be strings"
            continue
        captions[normal_name(file_name)] = text.strip()
    return captions, skipped


def _csv_captions(path: Path, *, label: str) -> tuple[dict[str, str], dict[str, str]]:
    reader = csv.DictReader(io.StringIO(_read_text(path, label=label)))
    if not reader.fieldnames or not {"file_name", "caption"} <= set(reader.fieldnames):
        raise DatasetError(
            f"{label}: {CAPTIONS_CSV} needs the columns file_name and caption; it has {reader.fieldnames}."
        )
    captions, skipped = {}, {}
    for number, row in enumerate(reader, 2):
        if not row.get("file_name") or row.get("caption") is None:
            skipped[f"{CAPTIONS_CSV} line {number}"] = "empty file_name or caption"
            continue
        captions[normal_name(row["file_name"])] = row["caption"].strip()
    return captions, skipped


def _read_text(path: Path, *, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{label}: {path.name} is not UTF-8 text ({err}).") from None


def normal_name(name: str) -> str:
    """A file name as a clean relative POSIX path (``./a\\b.png`` → ``a/b.png``)."""
    return PurePosixPath(*[p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]).as_posix()
