"""LoRA weights: the files the trainer writes, and LoRAs applied to one prediction at a time.

The format is diffusers' own, so the files work outside this package too:

* ``lora.safetensors`` — :meth:`StableDiffusionPipeline.save_lora_weights` of the peft adapters
  (``unet.…`` and ``text_encoder.…`` keys), read back by ``load_lora_weights``;
* ``lora_kohya.safetensors`` — the same weights through diffusers' ``convert_state_dict_to_kohya``
  (``lora_unet_…``/``lora_te1_…`` keys with ``.alpha``), for kohya/A1111/ComfyUI tools;
* the trainer's ``.tar`` holds both plus ``training.json`` (settings and data counts).

At prediction time a ``lora_weights`` value (http(s) URL, data URI or local path, to a trainer ``.tar``
or a ``.safetensors`` in either format) is resolved by :class:`LoraCache` to a verified local file,
loaded into the request's pipeline by :func:`apply_loras` (with the request's fast-mode LoRA, if any, each at
its own scale) and unloaded when the request ends, so the
next request without ``lora_weights`` runs the base model bit for bit.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "lora.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
TRAINING_INFO_NAME = "training.json"
ADAPTER_NAME = "jsd_lora"
# What the trainer trains (diffusers' train_text_to_image_lora.py and train_dreambooth_lora.py).
UNET_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
MAX_LORA_SCALE = 2.0
# A download, data URI or trainer .tar larger than this is refused: SD v1's attention layers at rank 128
# (UNet + text encoder, fp32) take about 140 MB, a trainer .tar holds two copies.
MAX_DOWNLOAD_BYTES = 1 << 30
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned
# The cache of resolved LoRA files: bounded in files and bytes, least recently used evicted first.
DEFAULT_CACHE_DIR = Path(os.environ.get("JSD_LORA_CACHE", Path(tempfile.gettempdir()) / "jsd-lora-cache"))
MAX_CACHE_FILES = 16
MAX_CACHE_BYTES = 4 << 30
_CHUNK = 1 << 20


class LoraError(ValueError):
    """A ``lora_weights`` value that cannot be used; the message names the input, the value and why."""


@dataclass(frozen=True)
class LoraFile:
    """A verified local LoRA ``.safetensors`` and where it came from."""

    path: Path
    sha256: str
    source: str  # the value as given, shortened for logs (a data URI is not repeated whole)


# ---------------------------------------------------------------------------------------- writing
def save_lora(
    folder: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> tuple[Path, Path]:
    """Write the peft adapters of ``unet`` (and ``text_encoder``) as ``weight_name`` and its kohya twin.

    diffusers' calls throughout (train_text_to_image_lora.py): ``get_peft_model_state_dict`` →
    ``convert_state_dict_to_diffusers`` → ``save_lora_weights``; the kohya file is
    ``convert_state_dict_to_kohya`` of the same peft state dict.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet_layers = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    text_layers = {}
    if text_encoder is not None:
        text_layers = get_peft_model_state_dict(text_encoder, adapter_name=adapter_name)
        if not hasattr(text_encoder, "text_model"):
            # transformers 5 flattened CLIPTextModel (no `text_model.`); LoRA files and the tools reading them
            # keep the prefix, and diffusers strips it again when loading (lora_base._load_lora_into_text_encoder).
            text_layers = {f"text_model.{key}": value for key, value in text_layers.items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=uniform_unet_keys(unet_layers),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_layers) if text_layers else None,
        weight_name=weight_name,
        safe_serialization=True,
    )
    peft_layers = {f"unet.{k}": v for k, v in unet_layers.items()} | {
        f"text_encoder.{k}": v for k, v in text_layers.items()
    }
    kohya = convert_state_dict_to_kohya(peft_layers)
    save_file({k: v.contiguous() for k, v in kohya.items()}, folder / KOHYA_WEIGHT_NAME)
    return folder / weight_name, folder / KOHYA_WEIGHT_NAME


def uniform_unet_keys(peft_layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's LoRA keys in one format: diffusers' old ``….to_k.lora.down`` when every layer has one, else peft's.

    ``convert_state_dict_to_diffusers`` renames attention layers only (``to_q``/``to_k``/``to_v``/``to_out``);
    an LCM-LoRA's convolutions and feed-forward layers keep peft's ``lora_A``. diffusers' ``load_lora_adapter``
    (diffusers 0.42, loaders/peft.py) decides from the *first key alone* whether to convert a UNet state dict,
    so a file mixing the two would lose one half (with a warning only). peft's keys load as they are.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(peft_layers)
    if any(".lora_A." in key or ".lora_B." in key for key in converted):
        return peft_layers
    return converted


# ---------------------------------------------------------------------------------------- resolving
class LoraCache:
    """Resolves ``lora_weights`` values to verified local ``.safetensors`` files.

    Files are stored by the SHA-256 of their content (``<sha256>.safetensors``); an index maps each URL to
    the hash of what it served. A cached file is re-hashed before every use: a file changed or truncated
    on disk (another process, a crash, a full disk) is dropped and fetched again, never loaded.
    At most ``max_files`` files and ``max_bytes`` bytes are kept, least recently used evicted first.
    """

    def __init__(
        self,
        folder: str | os.PathLike = DEFAULT_CACHE_DIR,
        *,
        max_files: int = MAX_CACHE_FILES,
        max_bytes: int = MAX_CACHE_BYTES,
        max_download_bytes: int = MAX_DOWNLOAD_BYTES,
    ) -> None:
        self.folder = Path(folder)
        self.max_files, self.max_bytes, self.max_download_bytes = max_files, max_bytes, max_download_bytes

    def resolve(self, value: str, *, name: str = "lora_weights") -> LoraFile:
        """The LoRA file behind ``value``; raises :class:`LoraError` naming ``name``."""
        if not isinstance(value, str) or not value.strip():
            raise LoraError(f"`{name}` must be a URL, a data URI or a file path, got {value!r}.")
        value = value.strip()
        scheme = urllib.parse.urlsplit(value).scheme.lower()
        self.folder.mkdir(parents=True, exist_ok=True)
        if scheme in ("http", "https"):
            path = self._lookup(value)
            if path is None:
                with self._scratch() as raw:
                    _download(value, raw, limit=self.max_download_bytes, name=name)
                    path = self._store(raw, value, name=name)
                self._remember(value, path.stem)
        elif scheme == "data":
            with self._scratch() as raw:
                _decode_data_uri(value, raw, limit=self.max_download_bytes, name=name)
                path = self._store(raw, _shorten(value), name=name)
        elif len(scheme) > 1:  # one letter: a Windows drive
            raise LoraError(
                f"`{name}` {_shorten(value)!r} uses the scheme {scheme!r}; give an http(s) URL, a data URI or a "
                "local path."
            )
        else:
            path = self._local(Path(value), name=name)
            if path.parent != self.folder:  # a user's own .safetensors, loaded where it is
                return LoraFile(path, _sha256(path), value)
        return LoraFile(path, path.stem, _shorten(value))  # cached files are named by their SHA-256

    # -- cache internals
    def _lookup(self, url: str) -> Path | None:
        digest = self._index().get(url)
        if digest is None:
            return None
        path = self.folder / f"{digest}.safetensors"
        if path.is_file() and _sha256(path) == digest:
            os.utime(path)  # most recently used
            logger.info("LoRA %s from the cache (sha256 %s)", _shorten(url), digest[:12])
            return path
        logger.warning(
            "Cached LoRA for %s is missing or changed on disk (expected sha256 %s): fetching it again.",
            _shorten(url),
            digest[:12],
        )
        path.unlink(missing_ok=True)
        return None

    def _store(self, raw: Path, source: str, *, name: str) -> Path:
        """Move the LoRA in ``raw`` (a .safetensors, or a trainer .tar holding one) into the cache."""
        lora = raw
        if tarfile.is_tarfile(raw):
            lora = raw.with_suffix(".member")
            _extract_lora_member(raw, lora, limit=self.max_download_bytes, name=name, source=source)
        check_safetensors(lora, name=name, source=source)
        digest = _sha256(lora)
        path = self.folder / f"{digest}.safetensors"
        os.replace(lora, path)
        self._evict(keep=path)
        return path

    def _local(self, path: Path, *, name: str) -> Path:
        if path.is_dir():  # scripts/train.py --lora_rank's output folder: its diffusers-named file
            if not (path / LORA_WEIGHT_NAME).is_file():
                raise LoraError(
                    f"`{name}` {str(path)!r} is a folder without {LORA_WEIGHT_NAME}: give the {LORA_WEIGHT_NAME} "
                    "(or the .tar) a LoRA training wrote."
                )
            path = path / LORA_WEIGHT_NAME
        if not path.is_file():
            raise LoraError(f"`{name}` {str(path)!r}: no such file (give an http(s) URL, a data URI or a local path).")
        if tarfile.is_tarfile(path):
            with self._scratch() as raw:
                shutil.copyfile(path, raw)
                return self._store(raw, str(path), name=name)
        check_safetensors(path, name=name, source=str(path))
        return path

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        os.close(handle)
        tmp = Path(tmp)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".member").unlink(missing_ok=True)

    def _index_path(self) -> Path:
        return self.folder / "urls.json"

    def _index(self) -> dict[str, str]:
        try:
            index = json.loads(self._index_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def _remember(self, url: str, digest: str) -> None:
        index = self._index()
        index[url] = digest
        present = {p.stem for p in self.folder.glob("*.safetensors")}
        _write_json(self._index_path(), {u: d for u, d in index.items() if d in present})

    def _evict(self, *, keep: Path) -> None:
        """Delete the least recently used files beyond ``max_files`` or ``max_bytes`` (never ``keep``)."""
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        count, size = 1, keep.stat().st_size
        for path in files:
            if path == keep:
                continue
            if count + 1 > self.max_files or size + path.stat().st_size > self.max_bytes:
                logger.info(
                    "Evicting cached LoRA %s (limits: %d files, %d bytes)", path.name, self.max_files, self.max_bytes
                )
                path.unlink(missing_ok=True)
            else:
                count, size = count + 1, size + path.stat().st_size


def check_safetensors(path: Path, *, name: str = "lora_weights", source: str | None = None) -> list[str]:
    """The tensor names of a readable ``.safetensors`` holding LoRA weights, or :class:`LoraError`."""
    shown = source or str(path)
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(
            f"`{name}` {shown!r} is neither a trainer .tar (with {LORA_WEIGHT_NAME}) nor a readable .safetensors "
            f"file: {err}"
        ) from None
    if not any("lora" in key for key in keys):
        raise LoraError(
            f"`{name}` {shown!r} holds no LoRA weights ({len(keys)} tensors, e.g. {keys[:3]}): give a LoRA in "
            "diffusers or kohya format."
        )
    return keys


# Cross-attention widths of the Stable Diffusion families: how a LoRA's base model is told from its shapes.
BASE_MODELS = {768: "SD 1.x (and Japanese Stable Diffusion)", 1024: "SD 2.x", 2048: "SDXL"}
_SDXL_KEYS = ("text_encoder_2.", "lora_te2_", "add_embedding", "input_blocks_4_1_transformer_blocks_1")


def lora_cross_attention_dims(path: Path, keys: list[str]) -> set[int]:
    """The input widths of the LoRA's cross-attention key/value projections (``attn2`` ``to_k``/``to_v``).

    Their down (A) matrix has shape (rank, cross_attention_dim) in every key format (peft ``lora_A``, kohya
    ``lora_down``, old diffusers ``to_k_lora.down``), so this is the text width the LoRA was made for.
    """
    downs = [
        key
        for key in keys
        if "attn2" in key
        and ("to_k" in key or "to_v" in key)
        and any(d in key for d in ("lora_A", "lora_down", "lora.down"))
        and key.endswith("weight")
    ]
    with safe_open(path, framework="pt") as f:
        return {int(f.get_slice(key).get_shape()[-1]) for key in downs}


def check_lora_base(path: Path, keys: list[str], cross_attention_dim: int, *, shown: str) -> None:
    """:class:`LoraError` naming ``shown`` when the LoRA at ``path`` was made for another base model.

    SDXL LoRAs are told by their second text encoder's keys or 2048-wide cross-attention, SD 2.x ones by
    1024-wide cross-attention (SD 1.x and JSD: 768; the tiny test checkpoints: smaller).
    """
    dims = lora_cross_attention_dims(path, keys)
    sdxl = any(marker in key for key in keys for marker in _SDXL_KEYS)
    other = sorted(d for d in dims if d != cross_attention_dim)
    if sdxl or other:
        made_for = (
            "SDXL" if sdxl else ", ".join(BASE_MODELS.get(d, f"a model with {d}-wide text features") for d in other)
        )
        raise LoraError(
            f"{shown} was made for {made_for}, not this model (cross-attention width {cross_attention_dim}, "
            f"{BASE_MODELS.get(cross_attention_dim, 'a test checkpoint')}): use a LoRA made for SD 1.x/JSD."
        )


def _extract_lora_member(archive: Path, dest: Path, *, limit: int, name: str, source: str) -> None:
    """Copy the trainer .tar's ``lora.safetensors`` (a regular file, at most ``limit`` bytes) to ``dest``."""
    try:
        with tarfile.open(archive) as tar:
            member = next((m for m in tar if m.name.lstrip("./") == LORA_WEIGHT_NAME), None)
            if member is None or not member.isfile():
                raise LoraError(f"`{name}` {source!r} is a .tar without a {LORA_WEIGHT_NAME} file.")
            if member.size > limit:
                raise LoraError(f"`{name}` {source!r}: {LORA_WEIGHT_NAME} has {member.size:,} bytes (limit {limit:,}).")
            with tar.extractfile(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LoraError(f"`{name}` {source!r} is a damaged .tar: {err}") from None


def _download(url: str, dest: Path, *, limit: int, name: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "jsd-lora"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, open(dest, "wb") as out:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > limit:
                raise LoraError(f"`{name}` {_shorten(url)!r} has {declared:,} bytes; at most {limit:,} are allowed.")
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > limit:
                    raise LoraError(f"`{name}` {_shorten(url)!r} is larger than the limit of {limit:,} bytes.")
                out.write(chunk)
    except urllib.error.HTTPError as err:
        raise LoraError(f"`{name}` {_shorten(url)!r} could not be downloaded: HTTP {err.code} {err.reason}.") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise LoraError(f"`{name}` {_shorten(url)!r} could not be downloaded: {err}.") from None
    logger.info("Downloaded LoRA %s (%d bytes)", _shorten(url), received)


def _decode_data_uri(uri: str, dest: Path, *, limit: int, name: str) -> None:
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise LoraError(f"`{name}` is a data URI without base64 data ({_shorten(uri)!r}).")
    if len(payload) * 3 // 4 > limit:
        raise LoraError(f"`{name}` data URI holds more than the limit of {limit:,} bytes.")
    try:
        dest.write_bytes(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError) as err:
        raise LoraError(f"`{name}` data URI is not valid base64: {err}.") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _shorten(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else f"{value[: limit - 20]}…({len(value):,} characters)"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- applying
def load_lora(pipe, lora: LoraFile, *, name: str = "lora_weights", adapter_name: str = ADAPTER_NAME) -> None:
    """Load ``lora`` into ``pipe``'s UNet and text encoder with diffusers' ``load_lora_weights``.

    diffusers converts kohya/A1111 keys itself (``lora_state_dict`` →
    ``_convert_non_diffusers_lora_to_diffusers``). A LoRA for another base model is refused with
    :class:`LoraError`: wrong shapes fail inside peft, and keys that match no layer (which diffusers
    only warns about) are counted here.
    """
    from peft.utils import get_peft_model_state_dict

    state_dict = load_file(lora.path)
    check_lora_base(
        lora.path, list(state_dict), pipe.unet.config.cross_attention_dim, shown=f"`{name}` {lora.source!r}"
    )
    expected = sum(1 for key in state_dict if "lora" in key and key.endswith(".weight"))
    try:
        pipe.load_lora_weights(state_dict, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError, IndexError) as err:
        raise LoraError(
            f"`{name}` {lora.source!r} does not fit this model (a LoRA for another base model?): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    loaded = 0
    for component in (pipe.unet, pipe.text_encoder):
        if adapter_name in getattr(component, "peft_config", {}):
            loaded += len(get_peft_model_state_dict(component, adapter_name=adapter_name))
    if loaded < expected:
        raise LoraError(
            f"`{name}` {lora.source!r}: only {loaded} of its {expected} LoRA weight matrices match layers of this "
            "model; it was made for another base model (e.g. SDXL or SD 2.x)."
        )


def unload_lora(pipe) -> None:
    """Remove every LoRA layer from ``pipe``'s UNet and text encoder (the base weights were never changed)."""
    pipe.unload_lora_weights()


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA of a request: the file, its scale, and the input it came from (named in errors)."""

    lora: LoraFile
    scale: float
    name: str = "lora_weights"


@contextlib.contextmanager
def apply_loras(pipe, loras: Sequence[AppliedLora]) -> Iterator[None]:
    """Load ``loras`` for the duration of the block, each as its own adapter at its own scale.

    diffusers' multi-adapter API (``loaders/lora_base.py``): ``load_lora_weights(..., adapter_name=...)`` per
    LoRA, then ``set_adapters(names, adapter_weights=scales)``, which sets every adapter's scale in the UNet
    and, for the adapters that have text-encoder layers, in the text encoder (peft's ``set_scale``: scale ×
    alpha / rank). So no ``cross_attention_kwargs`` scale is passed. Without ``loras`` nothing is loaded:
    the base model's exact path. Every adapter is unloaded when the block ends, whatever happened.
    """
    if not loras:
        yield
        return
    try:
        names = []
        for index, item in enumerate(loras):
            names.append(f"{ADAPTER_NAME}_{index}")
            load_lora(pipe, item.lora, name=item.name, adapter_name=names[-1])
        pipe.set_adapters(names, adapter_weights=[float(item.scale) for item in loras])
        yield
    finally:
        unload_lora(pipe)


def _first_line(err: BaseException, limit: int = 400) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text[:limit]
