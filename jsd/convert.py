"""Convert a Japanese Stable Diffusion checkpoint (rinna's 2022 layout) to the served layout.

rinna published pickled fp32 ``.bin`` weights, 2022 configs and a ``T5Tokenizer`` entry in
``model_index.json``. The served layout is what ``pipe.save_pretrained`` writes today: fp16
safetensors, current configs, ``tokenizer/`` for :class:`jsd.JapaneseTokenizer`, a scheduler config
with ``steps_offset``, and ``manifest.json``.

How the conversion stays safe and faithful:

* Pickles are never executed: each ``.bin`` is read with ``torch.load(weights_only=True)``, which
  accepts tensors and plain containers only; a pickle that would import or call anything else (the
  classic ``__reduce__`` → ``os.system``) is refused with :class:`UnsafePickleError` naming the file.
* The tensors are written once to a scratch safetensors file with the original config, and loaded
  from there by diffusers / transformers themselves (``use_safetensors=True``): their own code maps
  2022 key names (``text_model.`` prefixes, the VAE's ``query``/``key``/``value``/``proj_attn``) and
  drops integer buffers they no longer keep (``position_ids``). Any missing, unexpected or
  mis-shaped weight stops the conversion, naming the file.
* fp16 cast: the libraries cast floating-point weights and honour ``_keep_in_fp32_modules`` (none
  of the four classes declares one today); integer buffers are never cast. The safety checker goes
  to fp16 too, as in diffusers' own fp16 Stable Diffusion weights: its thresholds (about 0.18-0.2)
  move by less than 1e-4. Every weight is checked to be finite after the cast.
* Idempotent: everything is written under ``.<dest>.staging/`` next to ``dest``; each finished
  component is renamed into place there, so a rerun after an interruption skips it; the complete
  folder is renamed onto ``dest`` at the end. A complete, verified ``dest`` is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPTextModel

from jsd.loading import load_components, load_scheduler
from jsd.manifest import (
    MANIFEST_FILE,
    WeightsVerificationError,
    read_manifest,
    swap_into_place,
    verify_manifest,
    write_manifest,
)
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.tokenizer import JapaneseTokenizer

logger = logging.getLogger(__name__)

SERVED_DTYPE = torch.float16
MODEL_CLASSES = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "safety_checker": StableDiffusionSafetyChecker,
}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "safety_checker": "config.json",
    "scheduler": "scheduler_config.json",
    "feature_extractor": "preprocessor_config.json",
}
TOKENIZER_FILES = ("tokenizer/spiece.model", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")
REQUIRED = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# Converted in this order: small parts first, so a broken source fails fast.
ORDER = ("tokenizer", "scheduler", "feature_extractor", "text_encoder", "vae", "safety_checker", "unet")
# transformers stopped saving CLIP's position_ids buffer; it is recomputed, so dropping it loses nothing.
IGNORED_UNEXPECTED_SUFFIXES = ("position_ids",)
# In .<dest>.staging: what is being converted there (source, revision, dtype); a rerun for the same resumes.
STAMP_FILE = ".stamp.json"


class ConversionError(RuntimeError):
    """The source checkpoint cannot be converted; the message names the file and what to do."""


class UnsafePickleError(ConversionError):
    """A pickled weights file would import or call code when loaded: it is refused, never executed."""


@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` did."""

    dest: Path
    already_complete: bool
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- which files


def _is_variant(name: str) -> bool:
    """``diffusion_pytorch_model.fp16.safetensors`` is a variant; ``model-00001-of-00002.bin`` is not."""
    base = name.removesuffix(".index.json")
    return "." in base.rsplit(".", 1)[0]


def choose_weights(names: Iterable[str]) -> list[str]:
    """The weights files (and shard index) to read from one component folder's file names.

    Safetensors are preferred (nothing to unpickle); variants such as ``*.fp16.*`` are ignored.
    """
    names = sorted(names)
    for suffix in (".safetensors", ".bin"):
        weights = [n for n in names if n.endswith(suffix) and not _is_variant(n)]
        if weights:
            return weights + [n for n in names if n.endswith(f"{suffix}.index.json") and not _is_variant(n)]
    return []


def select_files(relpaths: Iterable[str]) -> list[str]:
    """The files of a checkpoint (posix paths relative to its root) that conversion reads.

    Used as ``allow_patterns`` for the hub download, so only what is needed is fetched. Raises
    :class:`ConversionError` when a required part is absent.
    """
    relpaths = set(relpaths)
    by_folder: dict[str, list[str]] = {}
    for rel in relpaths:
        parent = PurePosixPath(rel).parent.as_posix()
        by_folder.setdefault(parent, []).append(PurePosixPath(rel).name)
    chosen, missing = [], []
    for comp in MODEL_CLASSES:
        weights = choose_weights(by_folder.get(comp, []))
        config = f"{comp}/{CONFIG_FILES[comp]}"
        if weights and config in relpaths:
            chosen += [config] + [f"{comp}/{w}" for w in weights]
        elif comp in REQUIRED or weights or config in relpaths:
            missing.append(f"{comp}/ (needs {CONFIG_FILES[comp]} and .safetensors or .bin weights)")
    chosen += [f for f in TOKENIZER_FILES if f in relpaths]
    if TOKENIZER_FILES[0] not in relpaths:
        missing.append(TOKENIZER_FILES[0])
    for comp in ("scheduler", "feature_extractor"):
        config = f"{comp}/{CONFIG_FILES[comp]}"
        if config in relpaths:
            chosen.append(config)
        elif comp in REQUIRED or "safety_checker/config.json" in chosen:
            missing.append(config)
    if "model_index.json" in relpaths:
        chosen.append("model_index.json")
    if missing:
        raise ConversionError(f"The source checkpoint lacks {', '.join(sorted(missing))}.")
    return sorted(chosen)


def local_files(folder: Path) -> list[str]:
    """Posix paths of every file under ``folder`` (symlinks followed, as in the hub cache)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def local_revision(folder: Path) -> str:
    """The revision of a local checkpoint folder, for the manifest.

    In order: the snapshot name of a hub cache folder; the revision in the folder's own
    ``manifest.json`` (a served folder or a training export); the commit of a git clone whose root
    is ``folder`` itself; else ``"local"``. A folder merely *inside* a git repo (``out/stage2`` in
    this project) is not a clone of the weights: that repo's commit says nothing about them.
    """
    folder = folder.resolve()
    if folder.parent.name == "snapshots":
        return folder.name
    try:
        revision = read_manifest(folder).get("revision")
    except WeightsVerificationError:  # none, or not a manifest
        revision = None
    if isinstance(revision, str) and revision.strip():
        return revision
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "local"
    lines = out.stdout.splitlines()
    if len(lines) == 2 and Path(lines[0]).resolve() == folder and lines[1].strip():
        return lines[1].strip()
    return "local"


# --------------------------------------------------------------------------- safe unpickling


def load_pickled_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickled ``.bin`` file, read without executing code (``weights_only=True``)."""
    path = Path(path)
    if _is_lfs_pointer(path):
        raise ConversionError(
            f"{path} is a git-lfs pointer, not the weights: run `git lfs install && git lfs pull` in the clone."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False; keep only the line that says what was blocked.
        blocked = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
        if blocked:
            raise UnsafePickleError(
                f"Refused to load {path}: it is a pickle that would import or call code when loaded "
                f"({blocked[-1]}). Weights files must hold tensors only; download them again from a source you trust."
            ) from err
        raise _unreadable(path, err) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path} does not hold a state dict of tensors (found {type(state).__name__}).")
    return state


def _unreadable(path: Path, err: Exception) -> ConversionError:
    return ConversionError(
        f"{path} is not a readable PyTorch weights file ({str(err).strip()[:200]}): truncated or corrupt. "
        "Delete it and run the download again."
    )


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).startswith(b"version https://git-lfs")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights in old pickles): copy the repeats."""
    seen, out = set(), {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = (tensor.clone() if ptr in seen else tensor).contiguous()
        seen.add(ptr)
    return out


# --------------------------------------------------------------------------- components


def _convert_model(comp: str, src: Path, out: Path, scratch: Path, dtype: torch.dtype) -> None:
    cls = MODEL_CLASSES[comp]
    weights = _weights_files(src, choose_weights(p.name for p in src.iterdir()))
    load_from = src
    if weights[0].suffix == ".bin":
        # Tensors only, into a safetensors file the libraries load with their own key conversions.
        state: dict[str, torch.Tensor] = {}
        for path in weights:
            state.update(load_pickled_state_dict(path))
        load_from = scratch / comp
        shutil.rmtree(load_from, ignore_errors=True)  # left by an interrupted run
        load_from.mkdir(parents=True)
        shutil.copyfile(src / CONFIG_FILES[comp], load_from / CONFIG_FILES[comp])
        name = DIFFUSERS_WEIGHTS if comp in ("unet", "vae") else TRANSFORMERS_WEIGHTS
        save_file(_unshared(state), load_from / name, metadata={"format": "pt"})
        del state
    dtype_kw = {"torch_dtype": dtype} if comp in ("unet", "vae") else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(
            load_from, use_safetensors=True, local_files_only=True, output_loading_info=True, **dtype_kw
        )
    except (ValueError, RuntimeError, OSError, SafetensorError) as err:
        raise ConversionError(
            f"{comp} weights {', '.join(map(str, weights))} do not fit {src / 'config.json'}: {err}"
        ) from err
    _check_loading_info(comp, weights, info)
    _check_finite(comp, weights, model)
    model.save_pretrained(out, safe_serialization=True)
    if load_from != src:
        shutil.rmtree(load_from)


def _weights_files(src: Path, chosen: list[str]) -> list[Path]:
    """The weights files of one component: every shard its index lists (each must be there), or the one file."""
    index = [n for n in chosen if n.endswith(".index.json")]
    if not index:
        return [src / n for n in chosen]
    index_path = src / index[0]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConversionError(f"{index_path} is not a shard index with a `weight_map` ({err}).") from err
    missing = [name for name in shards if not (src / name).is_file()]
    if missing:
        raise ConversionError(
            f"{index_path} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not in {src}: "
            "the download is incomplete. Run it again."
        )
    return [src / name for name in shards]


def _check_loading_info(comp: str, weights: list[Path], info: dict) -> None:
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith(IGNORED_UNEXPECTED_SUFFIXES)),
        "mis-shaped": sorted(str(k) for k in info.get("mismatched_keys", ())),
    }
    found = {kind: keys for kind, keys in problems.items() if keys}
    if found:
        listing = "; ".join(
            f"{kind}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}" for kind, keys in found.items()
        )
        raise ConversionError(
            f"{', '.join(map(str, weights))} does not match the {comp} architecture in its config ({listing})."
        )


def _check_finite(comp: str, weights: list[Path], model: torch.nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConversionError(
                f"{comp} weight {name} from {', '.join(map(str, weights))} is not finite in {tensor.dtype} "
                "(values beyond fp16's range ±65504, or already NaN): serve it in float32 (--dtype float32)."
            )


def _convert_component(comp: str, src: Path, out: Path, scratch: Path, dtype: torch.dtype) -> None:
    if comp in MODEL_CLASSES:
        _convert_model(comp, src, out, scratch, dtype)
    elif comp == "tokenizer":
        JapaneseTokenizer.from_pretrained(src).save_pretrained(out)
    elif comp == "scheduler":
        load_scheduler(src).save_pretrained(out)  # adds SD v1's steps_offset=1 that rinna's config predates
    elif comp == "feature_extractor":
        CLIPImageProcessorPil.from_pretrained(src).save_pretrained(out)


def _write_model_index(staging: Path) -> None:
    """Load the converted folder as serving will (safetensors only) and write its ``model_index.json``."""
    components = load_components(staging, use_safetensors=True)
    pipe = JapaneseStableDiffusionPipeline(
        **components, requires_safety_checker=components["safety_checker"] is not None
    )
    pipe.save_config(staging)


# --------------------------------------------------------------------------- the whole checkpoint


def existing_checkpoint(dest: Path, *, source: str, revision: str | None) -> dict | None:
    """The manifest of ``dest`` when it already holds a verified conversion of ``source`` at ``revision``.

    ``revision=None`` accepts any revision. Returns ``None`` when ``dest`` does not exist; raises
    :class:`ConversionError` when it exists but is something else (unverified, or another source).
    """
    if not dest.exists():
        return None
    try:
        manifest = verify_manifest(dest)
    except WeightsVerificationError as err:
        raise ConversionError(
            f"{dest} exists but is not a verified checkpoint ({err}). Use --force to replace it."
        ) from err
    if manifest.get("source") != source or (revision is not None and manifest.get("revision") != revision):
        raise ConversionError(
            f"{dest} holds {manifest.get('source')}@{manifest.get('revision')}, not {source}@{revision or 'any'}. "
            "Use --force to replace it, or choose another --dest."
        )
    return manifest


def convert_checkpoint(
    source_dir: str | Path,
    dest: str | Path,
    *,
    source: str,
    revision: str,
    torch_dtype: torch.dtype = SERVED_DTYPE,
    force: bool = False,
) -> ConversionReport:
    """Convert the checkpoint in ``source_dir`` (2022 layout or current) to the served layout at ``dest``.

    Args:
        source_dir: a local checkpoint folder (a hub snapshot, a git clone, a training output).
        dest: the served folder to write; left alone when it already verifies for this source.
        source: recorded in the manifest (a hub repo id or a folder).
        revision: recorded in the manifest (the hub commit sha when known).
        torch_dtype: dtype of the served weights (float16 for GPUs; float32 to keep full precision).
        force: replace ``dest`` even when it holds something else.
    """
    source_dir, dest = Path(source_dir), Path(dest)
    if not force and existing_checkpoint(dest, source=source, revision=revision) is not None:
        return ConversionReport(dest, already_complete=True)
    relpaths = select_files(local_files(source_dir))
    staging = _staging(dest, {"source": source, "revision": revision, "dtype": str(torch_dtype)})
    report = ConversionReport(dest, already_complete=False)
    components = [c for c in ORDER if any(r.startswith(f"{c}/") for r in relpaths)]
    for comp in components:
        out = staging / comp
        if out.is_dir():  # finished by an earlier, interrupted run (renamed into place when complete)
            report.skipped.append(comp)
            continue
        tmp = staging / f".tmp-{comp}"
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converting %s", comp)
        _convert_component(comp, source_dir / comp, tmp, staging / ".scratch", torch_dtype)
        tmp.rename(out)
        report.converted.append(comp)
    _write_model_index(staging)
    for hidden in staging.glob(".*"):
        if hidden.name != STAMP_FILE:  # kept until the swap: a rerun after a kill before it resumes
            shutil.rmtree(hidden) if hidden.is_dir() else hidden.unlink()
    write_manifest(staging, source=source, revision=revision)
    _carry_nested_checkpoints(dest, staging)
    swap_into_place(staging, dest)
    (dest / STAMP_FILE).unlink(missing_ok=True)
    return report


def _carry_nested_checkpoints(dest: Path, staging: Path) -> None:
    """Move subfolders of ``dest`` holding checkpoints with their own manifest into ``staging``: the Japanese
    CLIP scorer (``japanese_clip/manifest.json``) and the fast-mode LoRAs (``fast/<name>/manifest.json``).

    Replacing the weights must not drop what was downloaded beside them; the new manifest does not list
    their files (``checkpoint_files`` leaves nested checkpoints to their own manifests).
    """
    if not dest.is_dir():
        return
    for sub in sorted(dest.iterdir()):
        nested = sub.is_dir() and any(sub.glob(f"**/{MANIFEST_FILE}"))
        if nested and not (staging / sub.name).exists():
            os.replace(sub, staging / sub.name)


def _staging(dest: Path, stamp: dict) -> Path:
    """``.<dest>.staging`` beside ``dest`` (same filesystem: renames are atomic), reset if for another source."""
    staging = dest.parent / f".{dest.name}.staging"
    stamp_file = staging / STAMP_FILE
    if staging.exists() and _read_stamp(stamp_file) != stamp:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{STAMP_FILE}.tmp"
    tmp.write_text(json.dumps(stamp))
    tmp.replace(stamp_file)  # never half a stamp
    return staging


def _read_stamp(stamp_file: Path) -> dict | None:
    """The stamp of a staging folder; ``None`` when missing or unreadable (then it is started over)."""
    try:
        return json.loads(stamp_file.read_text())
    except (OSError, ValueError):  # ValueError: truncated JSON, or not UTF-8
        return None


def describe(dest: str | Path) -> str:
    """One line about a served folder: source, revision, files and size, from its manifest."""
    manifest = read_manifest(dest)
    total = sum(f["size"] for f in manifest["files"].values())
    size = f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
    return f"{dest}: {manifest.get('source')}@{manifest.get('revision')}, {len(manifest['files'])} files, {size}"


# --------------------------------------------------------------------------- the Japanese CLIP scorer
SCORER_TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def scorer_weights_file(names: Iterable[str]) -> str:
    """The weights file to fetch from a scorer repo: ``model.safetensors`` if it has one, else rinna's pickle."""
    from jsd.japanese_clip import HUB_WEIGHTS_FILE, WEIGHTS_FILE

    names = set(names)
    for name in (WEIGHTS_FILE, HUB_WEIGHTS_FILE):
        if name in names:
            return name
    raise ConversionError(f"The scorer repo holds neither {WEIGHTS_FILE} nor {HUB_WEIGHTS_FILE}.")


def convert_scorer(
    source_dir: str | Path,
    spiece: str | Path,
    dest: str | Path,
    *,
    source: str,
    revision: str,
    torch_dtype: torch.dtype = SERVED_DTYPE,
    force: bool = False,
) -> ConversionReport:
    """Convert rinna's Japanese CLIP or CLOOB (``config.json`` + weights) to the served scorer folder ``dest``.

    ``dest`` gets rinna's ``config.json`` unchanged, ``model.safetensors`` (rinna's key names, ``torch_dtype``),
    ``tokenizer/`` (``spiece``: rinna/japanese-roberta-base's sentencepiece model) and ``manifest.json``;
    it is checked by loading it as :func:`jsd.japanese_clip.build_model` would before anything is written.
    """
    from jsd.japanese_clip import (
        CONFIG_FILE,
        TOKENIZER_SUBFOLDER,
        WEIGHTS_FILE,
        ScorerError,
        build_model,
        read_config,
    )

    source_dir, dest = Path(source_dir), Path(dest)
    if not force and existing_checkpoint(dest, source=source, revision=revision) is not None:
        return ConversionReport(dest, already_complete=True)
    weights = source_dir / scorer_weights_file(local_files(source_dir))
    try:
        config = read_config(source_dir)
        state = _read_state(weights)
        model = build_model(config, state, path=weights)
    except ScorerError as err:
        raise ConversionError(str(err)) from err
    served = {k: v.to(torch_dtype).contiguous() for k, v in model.rinna_state_dict().items()}
    bad = [k for k, v in served.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(f"{weights} has non-finite values in {bad[:3]} (after the cast to {torch_dtype}).")
    staging = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(source_dir / CONFIG_FILE, staging / CONFIG_FILE)
    save_file(served, staging / WEIGHTS_FILE)
    # rinna's load_tokenizer() forces do_lower_case=True ("bug of tokenizer config loading").
    JapaneseTokenizer(spiece, do_lower_case=True).save_pretrained(staging / TOKENIZER_SUBFOLDER)
    write_manifest(staging, source=source, revision=revision)
    swap_into_place(staging, dest)
    return ConversionReport(dest, already_complete=False, converted=[dest.name])


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from jsd.japanese_clip import load_weights

        return load_weights(path)
    return load_pickled_state_dict(path)
