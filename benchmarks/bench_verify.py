"""What verifying the served checkpoint costs at start-up: three ways of hashing the same bytes.

    .venv/bin/python benchmarks/bench_verify.py                 # the real sizes: about 2.7 GB written to a temp folder
    .venv/bin/python benchmarks/bench_verify.py --scale 0.1     # the same proportions at a tenth of the size

The files have the sizes of the fp16 served checkpoint (UNet 1.72 GB, safety checker 0.61 GB, text
encoder 0.25 GB, VAE 0.17 GB; random bytes: sha256 speed does not depend on content), with a
manifest written by ``jsd.manifest.write_manifest``. Then, each ``--repeats`` times:

- ``sequential``: each file hashed in turn on one core (what ``verify_manifest`` did at first);
- ``per-file threads``: one thread per file; the UNet, two thirds of the bytes, bounds it;
- ``blocks (jsd)``: ``jsd.manifest.verify_manifest`` — 64 MiB blocks hashed on all cores.

Each arm runs warm (files in the page cache, as right after ``cog build`` or a previous start) and
cold (the files dropped from the page cache with ``posix_fadvise(DONTNEED)`` first, so the disk is
read: a container's first start). It prints median seconds, GB/s and the ratio to ``sequential``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    from jsd.manifest import sha256_file, verify_manifest, write_manifest
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

# Bytes of each weights file of the fp16 served checkpoint (parameters × 2).
SERVED_SIZES = {
    "unet/diffusion_pytorch_model.safetensors": 1_719_125_864,
    "safety_checker/model.safetensors": 608_016_280,
    "text_encoder/model.safetensors": 246_144_152,
    "vae/diffusion_pytorch_model.safetensors": 167_335_342,
}


def write_files(folder: Path, scale: float) -> int:
    block = os.urandom(16 * 1024 * 1024)
    total = 0
    for name, size in SERVED_SIZES.items():
        size = int(size * scale)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for start in range(0, size, len(block)):
                # Vary each block so no two are equal (some filesystems deduplicate).
                f.write(start.to_bytes(8, "little") + block[8 : min(len(block), size - start)])
        total += size
    write_manifest(folder, source="bench_verify", revision="random")
    return total


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())  # dirty pages cannot be dropped
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sequential(folder: Path) -> None:
    for name in SERVED_SIZES:
        sha256_file(folder / name)


def per_file_threads(folder: Path) -> None:
    with ThreadPoolExecutor(len(SERVED_SIZES)) as pool:
        list(pool.map(sha256_file, [folder / name for name in SERVED_SIZES]))


def blocks(folder: Path) -> None:
    verify_manifest(folder)


ARMS = {"sequential": sequential, "per-file threads": per_file_threads, "blocks (jsd)": blocks}


def measure(folder: Path, arm, *, cold: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if cold:
            drop_from_page_cache(folder)
        start = time.perf_counter()
        arm(folder)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (default 1: 2.7 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder, deleted after)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    try:
        total = write_files(folder, args.scale)
        python = sys.version.split()[0]
        print(f"{total / 1e9:.2f} GB in {len(SERVED_SIZES)} files, {os.cpu_count()} CPUs, Python {python}")
        print(f"{'arm':<18} {'cache':<5} {'seconds':>8} {'GB/s':>6} {'vs sequential':>14}")
        for cold in (False, True):
            base = None
            for name, arm in ARMS.items():
                seconds = measure(folder, arm, cold=cold, repeats=args.repeats)
                base = base or seconds
                cache = "cold" if cold else "warm"
                print(f"{name:<18} {cache:<5} {seconds:>8.2f} {total / 1e9 / seconds:>6.2f} {base / seconds:>13.2f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
