"""Download rinna's Japanese Stable Diffusion, convert it to the served layout and verify it.

    # once: accept the CreativeML OpenRAIL-M license on https://huggingface.co/rinna/japanese-stable-diffusion
    export HF_TOKEN=hf_...                       # a read token of that account
    .venv/bin/python scripts/download_weights.py           # → weights/ (fp16 safetensors + manifest.json)
    .venv/bin/python scripts/download_weights.py --source ~/japanese-stable-diffusion --dest weights/   # a local clone
    .venv/bin/python scripts/download_weights.py --verify-only weights/                                 # check a folder
    .venv/bin/python scripts/download_weights.py --scorer rinna/japanese-clip-vit-b-16    # → weights/japanese_clip/
    .venv/bin/python scripts/download_weights.py --fast_mode lcm                          # → weights/fast/lcm/
    .venv/bin/python scripts/download_weights.py --fast_mode jsd-lcm --fast_mode_file out/distill   # a local LoRA
    .venv/bin/python scripts/download_weights.py --toy    # no access? the committed toy model of shapes → weights/

``--scorer`` fetches rinna's Japanese CLIP (or ``rinna/japanese-cloob-vit-b-16``; both Apache-2.0, not
gated) and the tokenizer it uses (rinna/japanese-roberta-base's ``spiece.model``), converts them to
safetensors and writes their own manifest into ``<dest>/japanese_clip/``: the scorer of best-of-N
(``num_candidates``) and of ``jsd evaluate``/``filter-data`` (docs/japanese-clip.md).

``--fast_mode NAME`` installs an acceleration LoRA for fast mode (docs/serving.md#fast-mode): ``lcm``
(latent-consistency/lcm-lora-sdv1-5), ``tcd`` (h1t/TCD-SD15-LoRA) or ``hyper-sd-4step`` (ByteDance/Hyper-SD's
Hyper-SD15-4steps-lora) from the hub, or any of them and ``jsd-lcm`` (``jsd distill``'s output) from a local
``--fast_mode_file`` (a .safetensors, or a folder holding pytorch_lora_weights.safetensors). The LoRA is checked
to fit the checkpoint in ``--dest`` (an SDXL or SD 2.x LoRA is refused) and written with its sampler settings,
source, revision and license (the hub card's) into ``<dest>/fast/NAME/`` with its own manifest.

Only the files serving needs are fetched (configs, tokenizer, the weights of unet, vae,
text_encoder and safety_checker), into the Hugging Face cache: an interrupted download resumes
where it stopped. Pickled ``.bin`` weights are converted without executing them (see jsd/convert.py).
Rerun the same command after any interruption; on a complete folder it is a quick no-op.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

DEFAULT_SOURCE = "rinna/japanese-stable-diffusion"
DEFAULT_DEST = "weights"
SCORER_TOKENIZER_REPO = "rinna/japanese-roberta-base"  # japanese_clip/tokenizer.py load_tokenizer()
GATED_HELP = """\
The Hugging Face hub refused access to {repo} ({reason}).
The weights are gated under the CreativeML OpenRAIL-M license. To get access:
  1. sign in on https://huggingface.co and accept the license on https://huggingface.co/{repo}
  2. create a read access token on https://huggingface.co/settings/tokens
  3. export HF_TOKEN=hf_...   and run this command again (the download resumes where it stopped).
{token_note}"""


class DownloadError(RuntimeError):
    """The hub download failed; the message says why and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="hub repo id or local checkpoint folder")
    parser.add_argument("--dest", default=DEFAULT_DEST, help="served folder to write (default: weights)")
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main; recorded as its commit sha)")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder for the raw download (default: HF_HOME's)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="dtype of served weights")
    parser.add_argument("--force", action="store_true", help="replace --dest even if it holds something else")
    parser.add_argument("--verify-only", metavar="DIR", help="only verify DIR against its manifest, then exit")
    parser.add_argument(
        "--allow-tiny", action="store_true", help="with --verify-only: accept a tiny or toy test checkpoint"
    )
    parser.add_argument(
        "--toy",
        action="store_true",
        help="instead of rinna's weights: copy the committed toy checkpoint (a toy model of shapes, docs/toy-world.md)",
    )
    parser.add_argument(
        "--scorer",
        metavar="REPO_OR_DIR",
        help="instead of the main weights: fetch a Japanese CLIP scorer (rinna/japanese-clip-vit-b-16 or "
        "rinna/japanese-cloob-vit-b-16, or a local folder) into <dest>/japanese_clip",
    )
    parser.add_argument(
        "--scorer-tokenizer",
        metavar="REPO_OR_DIR",
        default=SCORER_TOKENIZER_REPO,
        help=f"with --scorer: where its spiece.model comes from (default: {SCORER_TOKENIZER_REPO})",
    )
    parser.add_argument(
        "--fast_mode",
        "--fast-mode",
        metavar="NAME",
        help="instead of the main weights: install the acceleration LoRA of fast mode NAME into <dest>/fast/NAME "
        "(lcm, tcd, hyper-sd-4step from the hub; jsd-lcm from --fast_mode_file)",
    )
    parser.add_argument(
        "--fast_mode_file",
        "--fast-mode-file",
        metavar="PATH",
        help="with --fast_mode: a local LoRA .safetensors (diffusers or kohya keys), or a folder holding "
        "pytorch_lora_weights.safetensors (what `jsd distill` writes), instead of the hub download",
    )
    return parser.parse_args(argv)


def verify_only(folder: str, *, allow_tiny: bool) -> str:
    """Verify a served folder; refuses tiny test checkpoints (noise generators) unless ``allow_tiny``."""
    from jsd.convert import describe
    from jsd.manifest import WeightsVerificationError, verify_manifest
    from jsd.tiny import TINY_SOURCE_PREFIX
    from jsd.toyworld import TOY_SOURCE_PREFIX

    start = time.perf_counter()
    manifest = verify_manifest(folder)
    if str(manifest.get("source", "")).startswith((TINY_SOURCE_PREFIX, TOY_SOURCE_PREFIX)) and not allow_tiny:
        raise WeightsVerificationError(
            f"{folder} holds a tiny test checkpoint ({manifest['source']}), not the model: "
            "run scripts/download_weights.py first (or pass --allow-tiny)."
        )
    return f"verified {describe(folder)} in {time.perf_counter() - start:.1f} s"


def fetch_from_hub(repo_id: str, *, revision: str | None, cache_dir: str | None, choose=None) -> tuple[Path, str]:
    """Download the files conversion needs; returns the snapshot folder and the commit sha.

    ``choose``: picks the files to fetch from the repo's file names (default: the main checkpoint's).
    """
    from huggingface_hub import HfApi, get_token, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from jsd.convert import select_files

    token = get_token()  # HF_TOKEN, or the token saved by `hf auth login`
    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        files = (choose or select_files)([sibling.rfilename for sibling in info.siblings])
        print(f"downloading {len(files)} files of {repo_id}@{info.sha} (resumable) …", flush=True)
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=files, token=token, cache_dir=cache_dir)
    except RevisionNotFoundError as err:
        raise DownloadError(f"{repo_id} has no revision {revision!r}: give a branch, tag or commit sha.") from err
    except GatedRepoError as err:
        raise DownloadError(_gated_help(repo_id, "the license has not been accepted with this token", token)) from err
    except RepositoryNotFoundError as err:
        # Without a valid token the hub answers "not found" for gated repos too.
        raise DownloadError(_gated_help(repo_id, "repository not found or not visible to you", token)) from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise DownloadError(_gated_help(repo_id, f"HTTP {status}", token)) from err
        raise DownloadError(f"Download of {repo_id} failed ({err}); run again to resume.") from err
    except (LocalEntryNotFoundError, OSError) as err:
        raise DownloadError(
            f"Download of {repo_id} failed ({err}); check the network and run again to resume."
        ) from err
    return Path(folder), info.sha


def _gated_help(repo_id: str, reason: str, token: str | None) -> str:
    if token:
        note = "A token was sent: it may be invalid, or its account has not accepted the license yet."
    else:
        note = "No token was found: HF_TOKEN is not set and you are not logged in (`hf auth login`)."
    return GATED_HELP.format(repo=repo_id, reason=reason, token_note=note)


def is_local(source: str) -> bool:
    return Path(source).is_dir() or source.startswith((".", "/", "~"))


def main(argv: list[str] | None = None) -> int:
    if importlib.util.find_spec("huggingface_hub") is None:  # started by a Python without the project's packages
        from _venv import exit_with_hint  # this file's folder is sys.path[0]

        exit_with_hint("huggingface_hub")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from jsd.convert import ConversionError
    from jsd.fast_mode import FastModeError
    from jsd.manifest import WeightsVerificationError

    try:
        if args.verify_only:
            print(verify_only(args.verify_only, allow_tiny=args.allow_tiny))
            return 0
        if args.fast_mode:
            return _install_fast_mode(args)
        if args.fast_mode_file:
            raise FileNotFoundError("--fast_mode_file needs --fast_mode NAME (which fast mode it is).")
        if args.scorer:
            return _download_scorer(args)
        if args.toy:
            return _copy_toy(args)
        return _download_and_convert(args)
    except (ConversionError, WeightsVerificationError, DownloadError, FileNotFoundError, FastModeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _copy_toy(args: argparse.Namespace) -> int:
    """``--toy``: the committed toy checkpoint (verified) → ``--dest``; never over real weights without --force."""
    import shutil

    from jsd.manifest import MANIFEST_FILE, read_manifest, verify_manifest
    from jsd.tiny import TINY_SOURCE_PREFIX
    from jsd.toyworld import TOY_NOTE, TOY_PROMPT, TOY_SOURCE_PREFIX, TOY_WEIGHTS

    toy, dest = Path(__file__).resolve().parent.parent / TOY_WEIGHTS, Path(args.dest)
    if not (toy / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{toy} holds no toy checkpoint: build it with scripts/train_toy.py.")
    if (dest / MANIFEST_FILE).is_file() and not args.force:
        source = str(read_manifest(dest).get("source", ""))
        if not source.startswith((TINY_SOURCE_PREFIX, TOY_SOURCE_PREFIX)):
            raise FileNotFoundError(f"--dest {dest} holds other weights ({source}): pass --force to replace them.")
    verify_manifest(toy)
    staging = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(toy, staging)
    from jsd.manifest import swap_into_place

    swap_into_place(staging, dest)
    print(f"{dest}: {TOY_NOTE}. It draws 128x128 pictures such as {TOY_PROMPT}.")
    return 0


def _download_and_convert(args: argparse.Namespace) -> int:
    import torch

    from jsd.convert import ConversionError, convert_checkpoint, describe, existing_checkpoint, local_revision

    start = time.perf_counter()
    dest = Path(args.dest)
    local = is_local(args.source)
    source = str(Path(args.source).expanduser().resolve()) if local else args.source
    # Without --revision, a complete folder of this source is a no-op, decided without the network. A hub
    # --revision (a branch or tag) is resolved to its commit first; convert_checkpoint then compares.
    quick_check = args.revision is None or local
    if quick_check and not args.force and existing_checkpoint(dest, source=source, revision=args.revision):
        print(f"{describe(dest)}: already complete and verified; nothing to do.")
        return 0
    if local:
        folder = Path(source)
        if not folder.is_dir():
            raise ConversionError(f"--source {args.source!r} is not a folder.")
        revision = args.revision or local_revision(folder)
    else:
        folder, revision = fetch_from_hub(args.source, revision=args.revision, cache_dir=args.cache_dir)
    report = convert_checkpoint(
        folder, dest, source=source, revision=revision, torch_dtype=getattr(torch, args.dtype), force=args.force
    )
    if report.already_complete:
        print(f"{describe(dest)}: already complete and verified; nothing to do.")
        return 0
    done = ", ".join(report.converted) or "nothing"
    resumed = f" (resumed: {', '.join(report.skipped)} were already converted)" if report.skipped else ""
    print(f"converted {done}{resumed}")
    print(f"wrote {describe(dest)} in {time.perf_counter() - start:.1f} s")
    return 0


def _download_scorer(args: argparse.Namespace) -> int:
    """``--scorer``: rinna's Japanese CLIP/CLOOB and its tokenizer → ``<dest>/japanese_clip`` (+ manifest)."""
    import torch

    from jsd.convert import convert_scorer, describe, existing_checkpoint, local_revision, scorer_weights_file
    from jsd.japanese_clip import CONFIG_FILE, scorer_folder
    from jsd.manifest import sha256_file

    start = time.perf_counter()
    dest = scorer_folder(args.dest)
    # As for the main weights: without --revision, a complete scorer of this source is a no-op, without the network.
    local = is_local(args.scorer)
    source = str(Path(args.scorer).expanduser().resolve()) if local else args.scorer
    # a local folder is read again: the same path may hold a scorer trained since (its content decides, below)
    hub_skip = not local and not args.force and args.revision is None
    if hub_skip and existing_checkpoint(dest, source=source, revision=None):
        print(f"{describe(dest)}: already complete and verified; nothing to do.")
        return 0
    if local:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"--scorer {args.scorer!r} is not a folder.")
        revision = args.revision or local_revision(folder)
        if revision == "local":  # no name for this content: its weights file's hash is one
            names = [p.name for p in folder.iterdir()]
            revision = f"local-{sha256_file(folder / scorer_weights_file(names))[:16]}"
    else:

        def scorer_files(names: list[str]) -> list[str]:
            return [CONFIG_FILE, scorer_weights_file(names)]

        folder, revision = fetch_from_hub(
            args.scorer, revision=args.revision, cache_dir=args.cache_dir, choose=scorer_files
        )
    spiece = _scorer_spiece(folder, args)
    report = convert_scorer(
        folder, spiece, dest, source=source, revision=revision, torch_dtype=getattr(torch, args.dtype), force=args.force
    )
    if report.already_complete:
        print(f"{describe(dest)}: already complete and verified; nothing to do.")
    else:
        print(f"wrote {describe(dest)} in {time.perf_counter() - start:.1f} s")
    return 0


def _install_fast_mode(args: argparse.Namespace) -> int:
    """``--fast_mode NAME``: the public LoRA from the hub, or ``--fast_mode_file``, → ``<dest>/fast/NAME/``."""
    from jsd.fast_mode import LORA_FILE, RECIPES, FastModeError, describe_installed, install_fast_lora

    recipe = RECIPES.get(args.fast_mode)
    if recipe is None:
        raise FastModeError(f"--fast_mode must be one of {', '.join(RECIPES)}; got {args.fast_mode!r}.")
    if not (Path(args.dest) / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"--dest {args.dest} holds no checkpoint (unet/config.json): download the weights first (the LoRA is "
            "checked against them)."
        )
    license_ = None
    if args.fast_mode_file:
        path = Path(args.fast_mode_file).expanduser()
        lora = path / LORA_FILE if path.is_dir() else path
        if not lora.is_file():
            raise FileNotFoundError(f"--fast_mode_file {args.fast_mode_file}: no such file (or no {LORA_FILE} in it).")
        source, revision = str(lora.resolve()), args.revision or _file_revision(lora)
    elif recipe.repo is None:
        raise FastModeError(
            f"--fast_mode {args.fast_mode} has no public download: give --fast_mode_file (the LoRA `jsd distill` "
            "wrote)."
        )
    else:
        folder, revision = fetch_from_hub(
            recipe.repo, revision=args.revision, cache_dir=args.cache_dir, choose=lambda names: [recipe.filename]
        )
        lora, source = folder / recipe.filename, f"{recipe.repo}/{recipe.filename}"
        license_ = hub_card_license(recipe.repo, revision)
    import torch

    dtype = getattr(torch, args.dtype)  # served fp16 by default, as the main weights
    dest = install_fast_lora(
        lora, args.dest, args.fast_mode, source=source, revision=revision, license=license_, torch_dtype=dtype
    )
    print(f"installed fast mode {args.fast_mode} in {dest}")
    print(describe_installed(args.dest))
    return 0


def _file_revision(path: Path) -> str:
    from jsd.manifest import sha256_file

    return f"sha256:{sha256_file(path)[:16]}"


def hub_card_license(repo_id: str, revision: str) -> str | None:
    """The ``license`` of the repo's model card (``None`` when the card has none or cannot be read)."""
    from huggingface_hub import HfApi, get_token

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=get_token())
    except Exception:
        return None
    license_ = getattr(getattr(info, "card_data", None), "license", None)
    return str(license_) if license_ else None


def _scorer_spiece(folder: Path, args: argparse.Namespace) -> Path:
    """The scorer's sentencepiece model: in its folder (``tokenizer/`` or top level), else ``--scorer-tokenizer``."""
    from jsd.convert import SCORER_TOKENIZER_FILES

    for candidate in (folder / "tokenizer" / "spiece.model", folder / "spiece.model"):
        if candidate.is_file():
            return candidate
    if is_local(args.scorer_tokenizer):
        spiece = Path(args.scorer_tokenizer).expanduser() / "spiece.model"
        if not spiece.is_file():
            raise FileNotFoundError(f"--scorer-tokenizer {args.scorer_tokenizer!r} holds no spiece.model.")
        return spiece

    def tokenizer_files(names: list[str]) -> list[str]:
        return [name for name in SCORER_TOKENIZER_FILES if name in names]

    tokenizer, _ = fetch_from_hub(
        args.scorer_tokenizer, revision=None, cache_dir=args.cache_dir, choose=tokenizer_files
    )
    if not (tokenizer / "spiece.model").is_file():
        raise DownloadError(
            f"{args.scorer_tokenizer} has no spiece.model: give --scorer-tokenizer a folder holding one."
        )
    return tokenizer / "spiece.model"


if __name__ == "__main__":
    sys.exit(main())
