"""Checksum manifest of a served checkpoint: the sha256 and size of every file.

Written by the tools that produce a served folder (download/convert, fine-tuning, the tiny
checkpoint) and checked by serving before anything is loaded.

Cost of verification at start-up: every byte is hashed, about 2.6 GB for the fp16 model. Besides
each file's sha256, the manifest holds the sha256 of every 64 MiB block, so verification hashes
blocks on all cores at once instead of one file after the other: the UNet alone is two thirds of
the bytes, so hashing file by file could never be faster than hashing the UNet on one core.
``benchmarks/bench_verify.py`` measures the three ways side by side. The blocks cover every byte
and the size is checked too, so they prove the same as the whole-file sha256 (which stays in the
manifest for people checking a file by hand with ``sha256sum``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
BLOCK_SIZE = 64 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
# A file with one of these suffixes that the manifest does not list could be loaded instead of the
# verified weights (e.g. a stray pytorch_model.bin next to model.safetensors): verification refuses it.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx")


class WeightsVerificationError(RuntimeError):
    """A served checkpoint does not match its manifest; the message names the file."""


def swap_into_place(staging: Path, dest: Path) -> None:
    """Replace ``dest`` by the finished ``staging`` folder with renames (``dest`` is never half-written).

    ``staging`` must sit beside ``dest`` (same filesystem). The previous ``dest`` is moved to
    ``.<dest>.old`` for the instant between the two renames, then removed.
    """
    old = dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """The sha256 of a whole file, as ``sha256sum`` prints it."""
    return _hash_file(path)[0]


def _hash_file(path: Path, block_size: int | None = None) -> tuple[str, list[str]]:
    """One pass over ``path``: its sha256 and the sha256 of each ``block_size`` block."""
    block_size = block_size or BLOCK_SIZE
    whole, blocks = hashlib.sha256(), []
    block, filled = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(min(_CHUNK, block_size - filled)):
            whole.update(chunk)
            block.update(chunk)
            filled += len(chunk)
            if filled == block_size:
                blocks.append(block.hexdigest())
                block, filled = hashlib.sha256(), 0
    if filled or not blocks:
        blocks.append(block.hexdigest())
    return whole.hexdigest(), blocks


def _hash_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0 and (chunk := f.read(min(_CHUNK, length))):
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def _workers() -> int:
    return min(32, os.cpu_count() or 1)


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of the checkpoint, the manifest itself and hidden files excluded.

    A subfolder with its own manifest is a checkpoint of its own (the Japanese CLIP scorer in
    ``weights/japanese_clip/``), verified by its own manifest: its files are not this one's.
    """
    nested = [p.parent for p in folder.glob(f"*/**/{MANIFEST_FILE}")]
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not any(p.is_relative_to(sub) for sub in nested)
    )


def write_manifest(folder: str | Path, *, source: str, revision: str) -> Path:
    """Hash every file of ``folder`` into ``folder/manifest.json``; returns its path.

    Args:
        source: where the weights came from (a hub repo id, a folder, a training run).
        revision: the source's revision (the hub commit sha when known).
    """
    folder = Path(folder)
    paths = checkpoint_files(folder)
    with ThreadPoolExecutor(_workers()) as pool:
        hashes = list(pool.map(_hash_file, paths))
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": whole, "blocks": blocks}
        for p, (whole, blocks) in zip(paths, hashes, strict=True)
    }
    manifest = {
        "format": FORMAT_VERSION,
        "source": source,
        "revision": revision,
        "block_size": BLOCK_SIZE,
        "files": files,
    }
    path = folder / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a reader never sees half a manifest
    return path


def read_manifest(folder: str | Path) -> dict:
    """The manifest of ``folder``, checked for shape; raises ``WeightsVerificationError``."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise WeightsVerificationError(
            f"{path} is missing: serve only checkpoints written by scripts/download_weights.py, "
            "scripts/train.py or scripts/make_tiny_weights.py."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsVerificationError(f"{path} is not valid JSON: {err}") from err
    _check_shape(manifest, path)
    return manifest


def _check_shape(manifest: object, path: Path) -> None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise WeightsVerificationError(f"{path} lists no files: expected {{'files': {{relpath: {{size, sha256}}}}}}.")
    if manifest.get("format") != FORMAT_VERSION:
        raise WeightsVerificationError(
            f"{path} has format {manifest.get('format')!r}; this version of jsd reads format {FORMAT_VERSION}."
        )
    block_size = manifest.get("block_size", BLOCK_SIZE)  # optional, as verify_manifest reads it
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise WeightsVerificationError(
            f"{path} has block_size {block_size!r}: expected a positive integer (the bytes per hashed block)."
        )
    for name, entry in manifest["files"].items():
        relpath = PurePosixPath(name)
        if relpath.is_absolute() or ".." in relpath.parts or name in ("", "."):
            raise WeightsVerificationError(f"{path} lists {name!r}, which is not a path inside the checkpoint.")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            raise WeightsVerificationError(f"{path}: the entry for {name!r} lacks an integer size or a sha256.")


def verify_manifest(folder: str | Path) -> dict:
    """Check every file listed in the manifest (presence, size, sha256); returns the manifest.

    Raises ``WeightsVerificationError`` naming the first bad file: missing, truncated or grown,
    altered, or a weights file (``.bin``, ``.safetensors`` …) that the manifest does not list.
    Sizes are checked before any hashing, so a truncated file fails at once.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    block_size = manifest.get("block_size", BLOCK_SIZE)
    tasks = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise WeightsVerificationError(f"{path} is missing (listed in {MANIFEST_FILE}).")
        size = path.stat().st_size
        if size != expected["size"]:
            raise WeightsVerificationError(
                f"{path} has {size} bytes, the manifest says {expected['size']}: truncated or replaced."
            )
        tasks.extend(_hash_tasks(path, expected, block_size))
    _refuse_unlisted_weights(folder, manifest["files"])
    # Largest first, so the pool is not left waiting on one big file at the end.
    tasks.sort(key=lambda task: -task[2])
    pool = ThreadPoolExecutor(_workers())
    try:
        for (path, offset, length, want), digest in pool.map(_hash_task, tasks):
            if digest != want:
                where = f" (bytes {offset}-{offset + length - 1})" if length != path.stat().st_size else ""
                raise WeightsVerificationError(
                    f"{path} does not match its sha256 in {MANIFEST_FILE}{where}: altered or corrupt."
                )
    finally:
        pool.shutdown(cancel_futures=True)
    return manifest


def _hash_task(task: tuple[Path, int, int, str]) -> tuple[tuple[Path, int, int, str], str]:
    return task, _hash_range(*task[:3])


def _hash_tasks(path: Path, expected: dict, block_size: int) -> list[tuple[Path, int, int, str]]:
    """(path, offset, length, expected sha256) per block, or one task for the whole file."""
    size, blocks = expected["size"], expected.get("blocks")
    if not blocks or len(blocks) != max(1, -(-size // block_size)):
        return [(path, 0, size, expected["sha256"])]
    return [(path, i * block_size, min(block_size, size - i * block_size), want) for i, want in enumerate(blocks)]


def _refuse_unlisted_weights(folder: Path, listed: dict) -> None:
    for path in checkpoint_files(folder):
        if path.suffix in WEIGHT_SUFFIXES and path.relative_to(folder).as_posix() not in listed:
            raise WeightsVerificationError(
                f"{path} is not listed in {MANIFEST_FILE}: a weights file that was not verified could be loaded "
                "instead of the verified one. Remove it, or rewrite the manifest if it belongs there."
            )
