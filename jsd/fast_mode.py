"""Fast mode: acceleration LoRAs shipped in the weights folder, each with the sampler it was made for.

One folder per fast mode, ``<weights>/fast/<name>/``:

* ``pytorch_lora_weights.safetensors`` — the LoRA, in the key format its source ships (diffusers/peft or
  kohya; diffusers' ``load_lora_weights`` reads both), verified to fit this checkpoint when installed;
* ``fast_mode.json`` — how to sample with it (:class:`FastSettings`: scheduler, default steps and guidance,
  the limits it was made for) and where it came from (source, revision, license, base model);
* ``manifest.json`` — :mod:`jsd.manifest` of the two, verified before the LoRA is ever loaded. The main
  checkpoint's manifest leaves nested checkpoints to their own manifests, as for ``japanese_clip/``.

:func:`install_fast_lora` is the one writer (``scripts/download_weights.py --fast_mode`` for the public LoRAs and
local files, ``scripts/make_tiny_weights.py`` for the tiny test LoRA); :func:`load_fast_loras` the one reader
(serving). The names users pick are :data:`FAST_MODES`: ``off`` and the :data:`RECIPES`.

Sampling rule (what a request gets, documented in docs/serving.md#fast-mode): with a fast mode on,
``num_inference_steps``, ``guidance_scale`` and ``scheduler`` left at their plain defaults (25, 7.5,
DPM-Solver++ 2M) take the fast mode's own (e.g. 4, 1.0, LCM); any other value is used as given, but steps above
``max_steps`` or guidance above ``max_guidance_scale`` are refused naming the input: the LoRA was not made for
them (many steps with a consistency LoRA over-sharpen; high guidance burns the image).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from jsd.lora_weights import LoraError, LoraFile, check_lora_base, check_safetensors
from jsd.manifest import MANIFEST_FILE, WeightsVerificationError, sha256_file, swap_into_place, verify_manifest
from jsd.schedulers import SCHEDULERS

FAST_FOLDER = "fast"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights and the hub repos use
SETTINGS_FILE = "fast_mode.json"
OFF = "off"


class FastModeError(ValueError):
    """A fast-mode LoRA that is missing, damaged or made for another model; the message names the input."""


@dataclass(frozen=True)
class FastSettings:
    """How one acceleration LoRA samples, and where it came from (``fast_mode.json``)."""

    name: str
    scheduler: str  # a jsd.schedulers name
    num_inference_steps: int  # the default when the request leaves steps at the plain default
    guidance_scale: float  # 1.0: no classifier-free guidance (diffusers guides only above 1)
    max_steps: int  # the most steps a request may ask for with it
    max_guidance_scale: float
    source: str = ""  # hub repo id + file, or the local file installed
    revision: str = ""
    license: str = ""
    base: str = ""  # the model the LoRA was made for, as its card says


@dataclass(frozen=True)
class Recipe:
    """A known fast mode: where the public LoRA lives (``repo``/``filename``; ``None``: installed from a file)."""

    settings: FastSettings
    repo: str | None = None
    filename: str | None = None
    description: str = ""


def _recipe(name, scheduler, repo, filename, license, base, description) -> Recipe:
    # Every card: 4 steps, no classifier-free guidance (guidance 0 or 1 on the cards; diffusers guides only above 1).
    # LCM-LoRA's card allows guidance 1-2; 8 steps is the most any of the cards uses.
    settings = FastSettings(name, scheduler, 4, 1.0, 8, 2.0, license=license, base=base)
    return Recipe(settings, repo, filename, description)


RECIPES: dict[str, Recipe] = {
    "lcm": _recipe(
        "lcm",
        "LCM",
        "latent-consistency/lcm-lora-sdv1-5",
        "pytorch_lora_weights.safetensors",
        "openrail++",
        "runwayml/stable-diffusion-v1-5",
        "LCM-LoRA for SD 1.5 (Luo et al. 2023), LCMScheduler",
    ),
    "tcd": _recipe(
        "tcd",
        "TCD",
        "h1t/TCD-SD15-LoRA",
        "TCD-SD15-LoRA.safetensors",
        "mit",
        "runwayml/stable-diffusion-v1-5",
        "Trajectory Consistency Distillation LoRA for SD 1.5, TCDScheduler (eta 0.3)",
    ),
    "hyper-sd-4step": _recipe(
        "hyper-sd-4step",
        "DDIM trailing",
        "ByteDance/Hyper-SD",
        "Hyper-SD15-4steps-lora.safetensors",
        "see the repo's LICENSE.md",
        "runwayml/stable-diffusion-v1-5",
        "Hyper-SD's 4-step LoRA for SD 1.5, DDIM with trailing timesteps",
    ),
    "jsd-lcm": _recipe(
        "jsd-lcm",
        "LCM",
        None,
        None,
        "creativeml-openrail-m (a derivative of rinna/japanese-stable-diffusion)",
        "rinna/japanese-stable-diffusion",
        "jsd's own LCM-LoRA, distilled from this checkpoint (`jsd distill`)",
    ),
}
FAST_MODES = [OFF, *RECIPES]


@dataclass(frozen=True)
class FastLora:
    """An installed, verified fast-mode LoRA ready to load."""

    settings: FastSettings
    lora: LoraFile


def check_fast_mode_name(value: object) -> str:
    """``value`` if it is ``off`` or a known fast mode, else :class:`FastModeError` listing them."""
    if not isinstance(value, str) or value not in FAST_MODES:
        raise FastModeError(f"`fast_mode` must be one of {', '.join(map(repr, FAST_MODES))}; got {value!r}.")
    return value


def fast_folder(weights: str | Path, name: str) -> Path:
    return Path(weights) / FAST_FOLDER / name


def installed_names(weights: str | Path) -> list[str]:
    """The fast modes with a folder in ``weights`` (installed or not yet verified), sorted."""
    folder = Path(weights) / FAST_FOLDER
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    )


def load_fast_loras(weights: str | Path) -> dict[str, FastLora]:
    """Every fast-mode LoRA of ``weights``, each verified against its manifest; raises :class:`FastModeError`.

    A folder that is not a known fast mode, lacks its manifest or fails it fails loading (and so ``setup()``):
    a damaged LoRA is never served.
    """
    found = {}
    for name in installed_names(weights):
        folder = fast_folder(weights, name)
        if name not in RECIPES:
            raise FastModeError(f"{folder}: {name!r} is not a fast mode (known: {', '.join(RECIPES)}); remove it.")
        try:
            manifest = verify_manifest(folder)
        except WeightsVerificationError as err:
            raise FastModeError(
                f"fast mode {name!r} in {folder} failed verification ({err}); reinstall it with "
                f"`.venv/bin/python scripts/download_weights.py --fast_mode {name}`."
            ) from None
        settings = read_settings(folder)
        path = folder / LORA_FILE
        found[name] = FastLora(settings, LoraFile(path, manifest["files"][LORA_FILE]["sha256"], f"fast_mode {name}"))
    return found


def read_settings(folder: Path) -> FastSettings:
    """The :class:`FastSettings` in ``folder/fast_mode.json``, checked; raises :class:`FastModeError`."""
    path = folder / SETTINGS_FILE
    try:
        settings = FastSettings(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise FastModeError(f"{path} is not a fast-mode settings file: {err}") from None
    if settings.scheduler not in SCHEDULERS or settings.name != folder.name:
        raise FastModeError(f"{path}: scheduler {settings.scheduler!r} or name {settings.name!r} is not valid here.")
    return settings


def install_fast_lora(
    lora_file: str | Path,
    weights: str | Path,
    name: str,
    *,
    source: str,
    revision: str,
    license: str | None = None,
    cross_attention_dim: int | None = None,
    torch_dtype=None,
    base: str | None = None,
) -> Path:
    """Install ``lora_file`` as fast mode ``name`` in ``weights/fast/<name>/``; returns that folder.

    The LoRA is checked to be made for this checkpoint (``cross_attention_dim``: the UNet's, read from
    ``weights/unet/config.json`` when ``None``) before anything is written; the folder is written beside
    its final place and swapped in whole, with its manifest. ``torch_dtype`` (e.g. ``torch.float16``, the
    served dtype): its floating-point tensors are cast to it (``None``: kept as they are).
    """
    if name not in RECIPES:
        raise FastModeError(f"`--fast_mode` must be one of {', '.join(map(repr, RECIPES))}; got {name!r}.")
    lora_file = Path(lora_file)
    shown = f"`--fast_mode {name}` {source}"
    try:
        keys = check_safetensors(lora_file, name="fast_mode", source=source)
        check_lora_base(lora_file, keys, cross_attention_dim or unet_cross_attention_dim(weights), shown=shown)
    except LoraError as err:
        raise FastModeError(str(err)) from None
    recipe = RECIPES[name].settings
    settings = FastSettings(**(asdict(recipe) | {"source": source, "revision": revision}))
    overrides = {"license": license, "base": base}
    settings = FastSettings(**(asdict(settings) | {k: v for k, v in overrides.items() if v}))
    dest = fast_folder(weights, name)
    staging = dest.parent / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _copy_lora(lora_file, staging / LORA_FILE, torch_dtype)
    (staging / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=1, ensure_ascii=False) + "\n")
    from jsd.manifest import write_manifest

    write_manifest(staging, source=source, revision=revision)
    swap_into_place(staging, dest)
    return dest


def _copy_lora(src: Path, dest: Path, torch_dtype) -> None:
    """Copy the LoRA, its floating-point tensors cast to ``torch_dtype``; the key names and metadata are kept."""
    if torch_dtype is None:
        shutil.copyfile(src, dest)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    cast = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, dest, metadata=metadata)


def unet_cross_attention_dim(weights: str | Path) -> int:
    """The cross-attention width of the checkpoint's UNet (768 for SD 1.x and JSD; 1024 SD 2.x; 2048 SDXL)."""
    config = Path(weights) / "unet" / "config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["cross_attention_dim"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FastModeError(
            f"{config}: cannot read the UNet's cross_attention_dim ({err}); is {weights} a checkpoint?"
        ) from None


def describe_installed(weights: str | Path) -> str:
    """One line per installed fast mode (name, scheduler, steps, source, license, sha256) for logs and scripts."""
    lines = []
    for name in installed_names(weights):
        folder = fast_folder(weights, name)
        settings = read_settings(folder)
        digest = sha256_file(folder / LORA_FILE)[:12] if (folder / MANIFEST_FILE).is_file() else "unverified"
        lines.append(
            f"{name}: {settings.scheduler}, {settings.num_inference_steps} steps, guidance {settings.guidance_scale:g};"
            f" {settings.source}@{settings.revision or '?'} ({settings.license or 'license unknown'}), sha256 {digest}"
        )
    return "\n".join(lines)
