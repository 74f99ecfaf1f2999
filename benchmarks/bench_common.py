"""What the benchmarks share: the machine's description, the tokenizer to use, medians, training images.

Benchmarks print figures; they assert nothing (timings are not tests).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

try:
    import torch
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

REPO = Path(__file__).resolve().parents[1]
RINNA_SPIECE = Path(os.environ.get("JSD_SHARED", REPO.parent / "shared")) / "data" / "tokenizer" / "google_sp.model"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """One line naming where the figures were measured."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"device: cuda — {props.name} ({props.total_memory / 2**30:.1f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    return (
        f"device: cpu — {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}"
    )


def default_tokenizer_model() -> Path | None:
    """rinna's real sentencepiece model when ../shared has it, else ``None`` (jsd.tiny trains a small one)."""
    return RINNA_SPIECE if RINNA_SPIECE.is_file() else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_captioned_images(folder: Path, side: int, captions: list[str], count: int, noise_step: int) -> Path:
    """Seeded noise images with Japanese captions (``metadata.jsonl``), as scripts/train.py and jsd distill read them.

    Image ``i`` is PIL's Gaussian noise of deviation ``32 + noise_step * i``, captioned ``captions[i % len]``.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        Image.effect_noise((side, side), 32 + noise_step * i).convert("RGB").save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": captions[i % len(captions)]}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
