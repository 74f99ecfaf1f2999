"""A user's training images in one archive (.zip or .tar): unpacked safely, captioned, checked.

:func:`prepare_dataset` turns the archive into the image folder + ``metadata.jsonl`` that
:class:`jsd.training.data.ImageFolderSource` trains on. Captions come from the first of these found
in the archive's top folder:

1. ``metadata.jsonl`` — one JSON object per line, ``{"file_name": "0001.png", "text": "…"}``;
2. ``captions.csv`` — columns ``file_name`` and ``caption`` (UTF-8, with or without a BOM);
3. a ``.txt`` file per image with the same name (``0001.png`` + ``0001.txt``).

Limits (an archive beyond them fails; nothing is unpacked past the limit):

* the archive file: at most :data:`MAX_ARCHIVE_BYTES`;
* at most :data:`MAX_MEMBERS` entries, each file at most :data:`MAX_MEMBER_BYTES` unpacked, all files
  together at most :data:`MAX_TOTAL_BYTES`;
* a decompression ratio above :data:`MAX_RATIO` (per zip entry, or for a compressed tar as a whole),
  once more than :data:`RATIO_CHECK_BYTES` have been unpacked, marks a decompression bomb;
* paths must stay inside the archive's folder: absolute paths, ``..``, symbolic and hard links and
  special files are refused;
* an image above :data:`MAX_IMAGE_PIXELS` pixels is skipped, like a file that does not decode.

A skipped file (not an image, unreadable, no caption) is counted and named in the report; the
training fails only when no image is left. Every error names ``input_images`` and the file.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from jsd.captions import IMAGE_EXTENSIONS, METADATA_FILE, DatasetError, normal_name, read_captions

MAX_ARCHIVE_BYTES = 2 << 30  # 2 GiB
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 100 << 20  # 100 MiB per file
MAX_TOTAL_BYTES = 8 << 30  # 8 GiB unpacked
MAX_RATIO = 100  # images barely compress (about 1:1); text 3-10:1; bombs reach 1,000:1 and more
RATIO_CHECK_BYTES = 1 << 20  # smaller files cannot do harm, whatever their ratio
MAX_IMAGE_PIXELS = 50_000_000  # about 7,000 × 7,000; PIL itself refuses only above 179 M
IGNORED = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")  # what zip tools add on their own
_CHUNK = 1 << 20
MAX_SKIPPED_SHOWN = 20  # skipped files named in the training's log; training.json lists them all


@dataclass
class DatasetReport:
    """What was found in the archive and what the training uses."""

    folder: Path  # images + metadata.jsonl, ready for ImageFolderSource
    caption_source: str
    images_found: int
    images_used: int
    captions_found: int
    captions_used: int
    skipped: dict[str, str] = field(default_factory=dict)  # file → reason

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "folder"}


def prepare_dataset(
    archive: str | Path,
    dest: str | Path,
    *,
    caption_prefix: str = "",
    name: str = "input_images",
    filename: str | None = None,
) -> DatasetReport:
    """Unpack ``archive`` into ``dest``, match captions to images, keep the images that decode.

    Writes ``metadata.jsonl`` (``file_name``, ``text`` = ``caption_prefix`` + caption) beside the images.
    Raises :class:`DatasetError` when the archive is unsafe, over a limit or leaves no image to train on;
    its message names the input ``name`` and ``filename``, the user's name for the archive (default: the
    archive's own file name; ``""``: none known, as for a temporary copy of an upload, see :func:`upload_name`).
    """
    archive, dest = Path(archive), Path(dest)
    filename = archive.name if filename is None else filename
    label = f"`{name}` ({filename})" if filename else f"`{name}`"
    damaged = unpack(archive, dest, label=label)
    root = _top_folder(dest)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    if not files:
        raise DatasetError(f"{label} is empty: it holds no files.")
    images = [f for f in files if _is_image_name(f)]
    if not images:
        shown = ", ".join(files[:5]) + (" …" if len(files) > 5 else "")
        raise DatasetError(
            f"{label} holds no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); it has {len(files)} other "
            f"file(s): {shown}."
        )
    source, captions, skipped = read_captions(root, images, label=label)
    skipped |= {normal_name(_relative(path, dest, root)): reason for path, reason in damaged.items()}
    known = {*images, *([source] if source != "txt" else []), *(c for c in files if c.endswith(".txt"))}
    skipped |= {f: "not an image" for f in files if f not in known}
    rows = []
    for image in images:
        problem = check_image(root / image)  # first: a corrupt image is reported as such, captioned or not
        if problem:
            skipped[image] = problem
            continue
        caption = captions.get(image)
        if not caption:
            skipped[image] = f"no caption ({source})"
            continue
        text = f"{caption_prefix.strip()} {caption}".strip()
        rows.append(json.dumps({"file_name": image, "text": text}, ensure_ascii=False))
    if not rows:
        examples = "; ".join(f"{f}: {r}" for f, r in list(skipped.items())[:5])
        raise DatasetError(f"{label}: none of its {len(images)} image(s) can be trained on ({examples}).")
    (root / METADATA_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return DatasetReport(
        folder=root,
        caption_source=source,
        images_found=len(images),
        images_used=len(rows),
        captions_found=len(captions),
        captions_used=len(rows),
        skipped=skipped,
    )


def upload_name(path: str | Path) -> str:
    """The user's name of an uploaded file that Cog hands over as a temporary copy, or ``""`` if unknown.

    Cog downloads a URL (or decodes a data URI) given for a ``Path`` input into
    ``tempfile.NamedTemporaryFile(suffix=NAME)`` (``cog/types.py``, ``URLPath.convert``), ``NAME`` being the
    URL's file name (``get_filename``), so the copy is ``tmp`` + 8 random characters + ``NAME`` in the
    temporary directory. A data URI carries no name: Cog calls it ``file`` + an extension from its MIME type,
    and that is not the user's name. A path outside the temporary directory is the user's own file.
    """
    path = Path(path)
    if path.parent != Path(tempfile.gettempdir()):
        return path.name
    match = re.fullmatch(r"tmp[a-z0-9_]{8}(.+)", path.name)
    if match is None:
        return ""
    name = match.group(1)
    return "" if re.fullmatch(r"file(\.\w+)?", name) else name


def log_skipped(skipped: dict[str, str], log: logging.Logger, *, limit: int = MAX_SKIPPED_SHOWN) -> None:
    """One log line per skipped file (``name: reason``), the first ``limit`` of them, then how many more."""
    for file, reason in list(skipped.items())[:limit]:
        log.info("  skipped %s: %s", file, reason)
    if len(skipped) > limit:
        log.info("  … and %d more (all of them are listed in training.json)", len(skipped) - limit)


# ---------------------------------------------------------------------------------------- unpacking
def unpack(archive: Path, dest: Path, *, label: str) -> dict[str, str]:
    """Unpack a .zip or .tar (optionally gz/bz2/xz) into ``dest`` within the limits.

    Returns the entries that could not be read (damaged data: skipped like a corrupt image), by path.
    """
    if not archive.is_file():
        raise DatasetError(f"{label}: no such file.")
    size = archive.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise DatasetError(f"{label} has {size:,} bytes; archives of at most {MAX_ARCHIVE_BYTES:,} are accepted.")
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _unpack_zip(archive, dest, label=label)
    if _is_tar(archive):
        return _unpack_tar(archive, dest, size, label=label)
    raise DatasetError(f"{label} is neither a .zip nor a .tar archive (zip the images with their captions).")


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            tar.next()
        return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def safe_member_path(member: str, *, label: str) -> PurePosixPath | None:
    """The relative path of an archive entry, ``None`` for junk to ignore; raises if it leaves the folder."""
    cleaned = member.replace("\\", "/")  # some Windows tools write backslashes
    path = PurePosixPath(cleaned)
    if cleaned.startswith("/") or (len(path.parts) > 0 and path.parts[0].endswith(":")):
        raise DatasetError(f"{label}: {member!r} is an absolute path; the archive may only hold relative paths.")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{label}: {member!r} escapes the archive's folder (`..`); it is refused.")
    if not parts or any(p in IGNORED or p.startswith("._") for p in parts):
        return None
    return PurePosixPath(*parts)


class _Budget:
    """Counts what has been unpacked against the limits."""

    def __init__(self, label: str) -> None:
        self.label, self.total, self.members = label, 0, 0
        self.damaged: dict[str, str] = {}

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise DatasetError(
                f"{self.label} holds more than {MAX_MEMBERS:,} entries (the limit); {name!r} is one too many."
            )

    def copy(self, src: BinaryIO, dest: Path, name: str, *, compressed: int | None) -> None:
        """Copy one entry, checking its size, the total and (``compressed``: its packed size) the ratio."""
        written = 0
        with open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                self.total += len(chunk)
                if written > MAX_MEMBER_BYTES:
                    raise DatasetError(
                        f"{self.label}: {name!r} unpacks to more than {MAX_MEMBER_BYTES:,} bytes (the limit per file)."
                    )
                if self.total > MAX_TOTAL_BYTES:
                    raise DatasetError(f"{self.label} unpacks to more than {MAX_TOTAL_BYTES:,} bytes (the limit).")
                if compressed is not None and written > RATIO_CHECK_BYTES and written > MAX_RATIO * max(compressed, 1):
                    raise DatasetError(
                        f"{self.label}: {name!r} expands more than {MAX_RATIO}× ({compressed:,} bytes packed): a "
                        "decompression bomb, refused."
                    )
                out.write(chunk)


def _unpack_zip(archive: Path, dest: Path, *, label: str) -> dict[str, str]:
    budget = _Budget(label)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                budget.member(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DatasetError(f"{label}: {info.filename!r} is a symbolic link; links are refused.")
                path = safe_member_path(info.filename, label=label)
                if path is None or info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    raise DatasetError(f"{label}: {info.filename!r} is encrypted; zip without a password.")
                target = _target(dest, path, info.filename, label=label)
                try:
                    with zf.open(info) as src:
                        budget.copy(src, target, info.filename, compressed=info.compress_size)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                    target.unlink()  # a damaged entry (bad CRC, unknown method): skipped and reported
                    budget.damaged[path.as_posix()] = f"damaged in the archive ({type(err).__name__})"
    except zipfile.BadZipFile as err:
        raise DatasetError(f"{label} is a damaged zip archive: {err}.") from None
    return budget.damaged


def _unpack_tar(archive: Path, dest: Path, packed: int, *, label: str) -> dict[str, str]:
    budget = _Budget(label)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                budget.member(member.name)
                if member.issym() or member.islnk():
                    raise DatasetError(f"{label}: {member.name!r} is a link ({member.linkname!r}); links are refused.")
                path = safe_member_path(member.name, label=label)
                if member.isdir() or path is None:
                    continue
                if not member.isfile():
                    raise DatasetError(f"{label}: {member.name!r} is not a regular file (a device or pipe); refused.")
                target = _target(dest, path, member.name, label=label)
                with tar.extractfile(member) as src:
                    budget.copy(src, target, member.name, compressed=None)
                # A plain tar is never smaller than its content: only a compressed one can pass this.
                if budget.total > RATIO_CHECK_BYTES and budget.total > MAX_RATIO * packed:
                    raise DatasetError(
                        f"{label} expands more than {MAX_RATIO}× ({packed:,} bytes packed, {budget.total:,} unpacked "
                        f"by {member.name!r}): a decompression bomb, refused."
                    )
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # gzip's BadGzipFile is an OSError
        raise DatasetError(f"{label} is a damaged tar archive: {err}.") from None
    return budget.damaged


def _target(dest: Path, path: PurePosixPath, member: str, *, label: str) -> Path:
    target = dest.joinpath(*path.parts)
    resolved = target.resolve()
    if not resolved.is_relative_to(dest.resolve()):
        raise DatasetError(f"{label}: {member!r} escapes the archive's folder; it is refused.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DatasetError(f"{label}: {member!r} lies under a path that is also a file.") from None
    return target


def _relative(path: str, dest: Path, root: Path) -> str:
    """An unpacked path (relative to ``dest``) relative to the top folder ``root``."""
    return (dest / path).relative_to(root).as_posix() if (dest / path).is_relative_to(root) else path


def _top_folder(dest: Path) -> Path:
    """The folder the user zipped: ``dest`` itself, or its one subfolder when it holds nothing else."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


# ---------------------------------------------------------------------------------------- images
def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be trained on (unreadable, too large), or ``None``: it decodes fully."""
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_IMAGE_PIXELS:
                return f"too large ({image.width}×{image.height} pixels; at most {MAX_IMAGE_PIXELS:,})"
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__})"
    return None
