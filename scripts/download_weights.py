"""Download rinna's Japanese Stable Diffusion, convert it to the served layout and verify it.

    # once: accept the CreativeML OpenRAIL-M license on https://huggingface.co/rinna/japanese-stable-diffusion
    export HF_TOKEN=hf_...                       # a read token of that account
    .venv/bin/python scripts/download_weights.py           # → weights/ (fp16 safetensors + manifest.json)
    .venv/bin/python scripts/download_weights.py --source ~/japanese-stable-diffusion --dest weights/   # a local clone
    .venv/bin/python scripts/download_weights.py --verify-only weights/                                 # check a folder

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
    parser.add_argument("--allow-tiny", action="store_true", help="with --verify-only: accept a tiny test checkpoint")
    return parser.parse_args(argv)


def verify_only(folder: str, *, allow_tiny: bool) -> str:
    """Verify a served folder; refuses tiny test checkpoints (noise generators) unless ``allow_tiny``."""
    from jsd.convert import describe
    from jsd.manifest import WeightsVerificationError, verify_manifest
    from jsd.tiny import TINY_SOURCE_PREFIX

    start = time.perf_counter()
    manifest = verify_manifest(folder)
    if str(manifest.get("source", "")).startswith(TINY_SOURCE_PREFIX) and not allow_tiny:
        raise WeightsVerificationError(
            f"{folder} holds a tiny test checkpoint ({manifest['source']}), not the model: "
            "run scripts/download_weights.py first (or pass --allow-tiny)."
        )
    return f"verified {describe(folder)} in {time.perf_counter() - start:.1f} s"


def fetch_from_hub(repo_id: str, *, revision: str | None, cache_dir: str | None) -> tuple[Path, str]:
    """Download the files conversion needs; returns the snapshot folder and the commit sha."""
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
        files = select_files(sibling.rfilename for sibling in info.siblings)
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
    from jsd.manifest import WeightsVerificationError

    try:
        if args.verify_only:
            print(verify_only(args.verify_only, allow_tiny=args.allow_tiny))
            return 0
        return _download_and_convert(args)
    except (ConversionError, WeightsVerificationError, DownloadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


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


if __name__ == "__main__":
    sys.exit(main())
