"""Cold start: ``Predictor.setup()`` on the served layout against the 2022 loading path.

    nice .venv/bin/python benchmarks/bench_setup.py                    # full-size random weights (~6.3 GB in /tmp)
    .venv/bin/python benchmarks/bench_setup.py --size tiny --repeats 1 # a quick check of the harness
    .venv/bin/python benchmarks/bench_setup.py --device cuda           # on a GPU host (both arms end on the GPU)

It writes one seeded checkpoint twice under a temporary folder (deleted afterwards unless ``--keep``):

- ``served/``: the served layout — fp16 safetensors and a checksum manifest (jsd.tiny.make_checkpoint);
- ``rinna-2022/``: the same weights as rinna's 2022 files — pickled fp32 state dicts under rinna's
  file names (``unet/diffusion_pytorch_model.bin``, ``text_encoder/pytorch_model.bin`` …) and the key
  names and configs diffusers 0.4 / transformers 4.22 wrote (jsd.tiny.write_2022_checkpoint), no manifest.

Then, each in a fresh Python process (so that nothing is cached in the process and peak RSS is
the arm's own), interleaved over ``--repeats`` rounds:

- ``setup``: ``predict.Predictor().setup()`` with ``JSD_WEIGHTS=served/`` — manifest verification,
  fp16 safetensors loaded into the serving dtype of this device (fp32 on a CPU), the fast path;
- ``served-fp16``: what ``setup()`` does on a GPU, on this device — manifest verification, then
  ``from_pretrained(served, torch_dtype=float16)`` and ``.to(device)``; on a CPU host, the host half of a
  GPU start-up (all that is left is the copy of 2.5 GB to the GPU);
- ``2022``: ``JapaneseStableDiffusionPipeline.from_pretrained(rinna-2022/, torch_dtype=float32)`` then
  ``.to(device)`` — rinna's README path on today's libraries, which build models on the meta device;
- ``2022-init``: the same as the diffusers of 2022 (before 0.6) loaded: UNet and VAE (about 70% of the
  weights) are first built with random weights, then overwritten by the file (today's diffusers skips
  that initialisation even with ``low_cpu_mem_usage=False``; the benchmark undoes both).

Every arm ends with every weight resident (read once on a CPU, copied on a GPU): the loaders memory-map
the files, and an unread weight is a cost deferred to the first prediction, not saved. It prints each
arm's median seconds (process start to ready is import + setup), peak RSS, and the ratios against
``2022``. By default the files are in the page cache (just written), as on a warm host; ``--cold``
evicts them before every run (``posix_fadvise(DONTNEED)`` on those files only), as after a reboot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, default_tokenizer_model, device_label, median  # benchmarks/ is on sys.path

ARMS = ("setup", "served-fp16", "2022", "2022-init")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="full", help="random-weight shapes (default: full)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all arms (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a new /tmp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument(
        "--cold", action="store_true", help="evict the checkpoint's files from the page cache before every run"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="sentencepiece model (default: rinna's from ../shared if present)"
    )
    parser.add_argument("--child", nargs=2, metavar=("ARM", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def write_checkpoints(workdir: Path, size: str, tokenizer: Path | None) -> tuple[Path, Path]:
    """The served layout and its 2022 twin (pickled fp32 under rinna's names), from one seeded model."""
    import torch

    from jsd.tiny import make_checkpoint

    served, legacy = workdir / "served", workdir / "rinna-2022"
    if (served / "manifest.json").is_file() and (legacy / "unet" / "diffusion_pytorch_model.bin").is_file():
        print(f"reusing the checkpoints in {workdir} (delete it to rebuild)")
        return served, legacy
    start = time.perf_counter()
    served = make_checkpoint(served, tokenizer_model=tokenizer, size=size, torch_dtype=torch.float16)
    print(f"wrote {served} (fp16 safetensors + manifest, {_folder_gib(served):.2f} GiB) in {_since(start)}")
    start = time.perf_counter()
    legacy = write_2022_copy(served, legacy)
    print(f"wrote {legacy} (pickled fp32 .bin, {_folder_gib(legacy):.2f} GiB) in {_since(start)}")
    return served, legacy


def write_2022_copy(served: Path, dest: Path) -> Path:
    """Copy ``served`` as rinna's 2022 files: pickled fp32 state dicts under 2022 key names, 2022 configs."""
    from jsd.tiny import write_2022_checkpoint

    return write_2022_checkpoint(served, dest)


def child(arm: str, folder: str, device: str) -> dict:
    """One measurement in this (fresh) process: import time, time to ready, peak RSS."""
    start = time.perf_counter()
    import torch

    from jsd import JapaneseStableDiffusionPipeline
    from jsd.manifest import verify_manifest

    imported = time.perf_counter()
    verify_s = None
    if arm == "setup":
        os.environ["JSD_WEIGHTS"] = folder
        from predict import Predictor

        imported = time.perf_counter()
        predictor = Predictor()
        predictor.setup()
        pipe = predictor.generator.pipeline
    elif arm == "served-fp16":
        verify_manifest(folder)
        verify_s = time.perf_counter() - imported
        pipe = JapaneseStableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, use_safetensors=True)
        pipe.to(device)
    else:
        if arm == "2022-init":
            import contextlib

            from diffusers.models import modeling_utils

            # The diffusers of 2022 built each model with random weights, then copied the file in. Today's
            # skips the initialisation even with low_cpu_mem_usage=False (no_init_weights): undo both.
            modeling_utils._LOW_CPU_MEM_USAGE_DEFAULT = False
            modeling_utils.no_init_weights = contextlib.nullcontext
        pipe = JapaneseStableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=False)
        pipe.to(device)
    materialize(pipe)
    ready = time.perf_counter()
    return {
        "arm": arm,
        "import_s": imported - start,
        "setup_s": ready - imported,
        "verify_s": verify_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "dtype": str(pipe.unet.dtype),
    }


def materialize(pipe) -> None:
    """Make every weight resident: read each CPU tensor once, wait for the GPU copies.

    Both layouts are memory-mapped by the loaders (safetensors, and ``torch.load(mmap=True)`` for .bin), so
    "loaded" weights may not have been read yet; the first prediction (or the copy to a GPU) would pay for
    it. Reading them here puts that cost where it belongs, in the start-up.
    """
    import torch

    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in [*module.parameters(), *module.buffers()]:
                    if tensor.device.type == "cpu":
                        tensor.sum()
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def measure(arm: str, folder: Path, device: str) -> dict:
    """Run ``child`` in a fresh interpreter, offline, with the repository importable (for predict.py)."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # the predictor picks CUDA whenever it sees one
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--child", arm, str(folder)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{arm} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, list[dict]]) -> None:
    """Medians per arm (seconds to ready after imports), the largest peak RSS, and ratios against ``2022``."""
    print(f"\n{'arm':<12} {'dtype':<8} {'ready s':>8} {'import s':>9} {'peak RSS':>10}   runs (ready s)")
    medians = {}
    for arm, runs in results.items():
        ready = median([r["setup_s"] for r in runs])
        imported = median([r["import_s"] for r in runs])
        rss = max(r["peak_rss_bytes"] for r in runs)
        medians[arm] = (ready, rss)
        dtype = runs[0]["dtype"].removeprefix("torch.")
        runs_text = ", ".join(f"{r['setup_s']:.2f}" for r in runs)
        print(f"{arm:<12} {dtype:<8} {ready:8.2f} {imported:9.2f} {rss / 2**30:6.2f} GiB   {runs_text}")
    verify = [r["verify_s"] for runs in results.values() for r in runs if r["verify_s"] is not None]
    if verify:
        print(f"of which manifest verification (sha256 of every file): median {median(verify):.2f} s")
    if "2022" in medians:
        base_s, base_rss = medians["2022"]
        for arm, (ready, rss) in medians.items():
            if arm != "2022":
                print(f"ratio {arm} / 2022: time {ready / base_s:.2f}, peak RSS {rss / base_rss:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.device)))
        return
    import torch

    print(device_label(torch.device(args.device)))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jsd-bench-setup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        served, legacy = write_checkpoints(workdir, args.size, args.tokenizer or default_tokenizer_model())
        folders = {"setup": served, "served-fp16": served, "2022": legacy, "2022-init": legacy}
        results = {arm: [] for arm in args.arms}
        for repeat in range(args.repeats):
            order = args.arms if repeat % 2 == 0 else list(reversed(args.arms))
            for arm in order:
                if args.cold:
                    evict(folders[arm])
                results[arm].append(measure(arm, folders[arm], args.device))
        cache = "evicted from the page cache before every run (cold)" if args.cold else "in the page cache (warm)"
        print(f"{args.size} SD v1 shapes, {args.repeats} interleaved rounds, fresh process each, device {args.device}")
        print(f"checkpoint files {cache}")
        report(results)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def evict(folder: Path) -> None:
    """Drop ``folder``'s files (only those) from the page cache, as after a reboot: the next read hits the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # written pages must be clean to be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _folder_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


if __name__ == "__main__":
    main()
