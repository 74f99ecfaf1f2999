"""Checksum manifest of a served checkpoint: the sha256 and size of every file.

Written by the tools that produce a served folder (download/convert, fine-tuning, the tiny
checkpoint) and checked by serving before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class WeightsVerificationError(RuntimeError):
    """A served checkpoint does not match its manifest; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of the checkpoint, the manifest itself and hidden files excluded."""
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(folder).parts)  # noqa: E731
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and not hidden(p))


def write_manifest(folder: str | Path, *, source: str, revision: str) -> Path:
    """Hash every file of ``folder`` into ``folder/manifest.json``; returns its path."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in checkpoint_files(folder)
    }
    manifest = {"format": FORMAT_VERSION, "source": source, "revision": revision, "files": files}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise WeightsVerificationError(
            f"{path} is missing: serve only checkpoints written by scripts/download_weights.py, "
            "scripts/train.py or scripts/make_tiny_weights.py."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsVerificationError(f"{path} is not valid JSON: {err}") from err


def verify_manifest(folder: str | Path) -> dict:
    """Check every file listed in the manifest (presence, size, sha256); returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise WeightsVerificationError(f"{path} is missing (listed in {MANIFEST_FILE}).")
        size = path.stat().st_size
        if size != expected["size"]:
            raise WeightsVerificationError(
                f"{path} has {size} bytes, the manifest says {expected['size']}: truncated or replaced."
            )
        if sha256_file(path) != expected["sha256"]:
            raise WeightsVerificationError(f"{path} does not match its sha256 in {MANIFEST_FILE}: altered or corrupt.")
    return manifest
