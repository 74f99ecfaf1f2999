"""Files in and out of a Cog server as data URIs (coglet returns them when no upload URL is set)."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

# what mimetypes gets wrong or lacks on some systems (.jpe for JPEG, nothing for WebP)
_EXTENSIONS = {"image/webp": ".webp", "image/png": ".png", "image/jpeg": ".jpg", "application/x-tar": ".tar"}


def encode_file(path: Path) -> str:
    """``path`` as a data URI, its MIME type guessed from its name."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return encode_bytes(path.read_bytes(), mime)


def encode_bytes(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode(uri: str) -> tuple[str, bytes]:
    """A data URI's MIME type and bytes."""
    header, _, payload = uri.partition(",")
    return header.removeprefix("data:").split(";")[0], base64.b64decode(payload)


def extension(mime: str) -> str:
    """The file name suffix for ``mime`` (``""`` when none is known)."""
    return _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ""


def write_file(uri: str, folder: Path, stem: str) -> Path:
    """Decode ``uri`` into ``folder/{stem}{ext}`` (the extension from its MIME type); returns the path."""
    mime, data = decode(uri)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{extension(mime)}"
    path.write_bytes(data)
    return path


def write_prediction_output(output: str | list[str], folder: Path) -> list[Path]:
    """A prediction's output (one data URI or a list) into ``folder/output.{i}.{ext}``."""
    outputs = output if isinstance(output, list) else [output]
    return [write_file(uri, folder, f"output.{index}") for index, uri in enumerate(outputs)]


def write_training_output(output: dict[str, str], folder: Path) -> list[Path]:
    """Each file of a training's output object (``weights``) into ``folder/{key}{ext}``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_file(uri, folder, key) for key, uri in output.items()]
