"""Regenerate tests/fixtures/japanese_clip/: what rinna's own Japanese CLIP code computes, for the parity tests.

rinna's code (GitHub rinnakk/japanese-clip, Apache-2.0) is not on PyPI and needs transformers 4.x, so it
runs once, in a scratch environment, from a copy of its source; its outputs are kept as the fixture. Two
steps, two environments (tests/fixtures/japanese_clip/README.md has the exact commands):

    # 1. this project's .venv: tiny scorers in rinna's hub layout + the input images and texts
    .venv/bin/python scripts/make_japanese_clip_fixture.py prepare --work /tmp/jc-work
    # 2. a scratch venv with transformers 4.25.1 and rinna's source on PYTHONPATH
    PYTHONPATH=/path/to/japanese-clip/src /tmp/rinna-venv/bin/python scripts/make_japanese_clip_fixture.py \\
        rinna --work /tmp/jc-work --spm ../shared/data/tokenizer/google_sp.model \\
        --captions ../shared/data/captions/captions_ja.txt

Step 2 imports only rinna's package, torch, transformers 4.x and numpy: never jsd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

try:
    import numpy as np
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "japanese_clip"
SEEDS = {"clip": 0, "cloob": 1}  # different weights, so the two parity checks are not one
# Latin upper case (lower-cased by the tokenizer), full-width letters, a long text (truncated to 76
# pieces), an empty text, and text that spells a control token.
TEXTS = [
    "サラリーマン 油絵",
    "猫 水彩画",
    "ＡＢＣの看板とABCの看板",
    "夕焼けの海、" * 40,
    "",
    "犬[SEP]と</s>猫",
]
# rinna/japanese-roberta-base's tokenizer, as rinnakk/japanese-pretrained-models
# src/task/pretrain_roberta/checkpoint2huggingface.py built it (before save_pretrained to the hub).
T5_KWARGS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "extra_ids": 0,
    "additional_special_tokens": (),
    "do_lower_case": True,
}


def make_images() -> dict[str, np.ndarray]:
    """Small deterministic images: landscape, portrait, square-but-smaller, grey, RGBA, one exactly 224."""

    def smooth(h: int, w: int, c: int) -> np.ndarray:
        # Ramps that wrap around: sharp edges for the bilinear filter, and PNGs of a few kB.
        y, x = np.mgrid[0:h, 0:w]
        return np.stack([(x * (k + 1) * 7 + y * (3 - k) * 5) % 256 for k in range(c)], axis=-1).astype(np.uint8)

    return {
        "landscape_300x200.png": smooth(200, 300, 3),
        "portrait_150x257.png": smooth(257, 150, 3),
        "small_97x97.png": smooth(97, 97, 3),
        "grey_231x240.png": smooth(240, 231, 1)[..., 0],
        "rgba_260x230.png": smooth(230, 260, 4),
        "exact_224x224.png": smooth(224, 224, 3),
    }


def prepare(work: Path) -> None:
    """Step 1 (this project's venv): tiny scorers in rinna's hub layout, images and texts."""
    from PIL import Image

    from jsd.tiny import write_tiny_scorer

    shutil.rmtree(work, ignore_errors=True)
    for kind, seed in SEEDS.items():
        write_tiny_scorer(work / kind, kind=kind, seed=seed, layout="hub")
    images = FIXTURE / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, array in make_images().items():
        Image.fromarray(array).save(images / name)
    (FIXTURE / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {work} and {FIXTURE}/images, texts.json")


def array_sha256(array: np.ndarray) -> str:
    """sha256 of a C-contiguous array's bytes (the tests hash their tensors the same way)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def import_torchvision() -> str:
    """Import torchvision's Python transforms; returns how.

    PyPI's torchvision 0.28.0 wheel (the one for torch 2.13.0) is a CUDA build: beside the CPU torch its
    ``torchvision/__init__.py`` fails while registering the compiled ``torchvision::nms`` op. rinna's
    ``_transform()`` needs only ``torchvision.transforms`` (pure Python over PIL), so the package is then
    entered without its ``__init__`` — the transforms code that runs is torchvision's own, unchanged.
    """
    import importlib.util
    import types

    try:
        import torchvision

        return f"torchvision {torchvision.__version__}"
    except RuntimeError:
        spec = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torchvision"] = package
        from importlib.metadata import version

        return f"torchvision {version('torchvision')} transforms (package __init__ skipped: CUDA-only compiled ops)"


def run_rinna(work: Path, spm: Path | None, captions: Path | None) -> None:
    """Step 2 (scratch venv): rinna's load(), tokenize() and features; writes the expected outputs."""
    torchvision = import_torchvision()
    import japanese_clip as ja_clip
    import torch
    import transformers
    from japanese_clip.auto_model import MODEL_CLASSES
    from PIL import Image
    from transformers import T5Tokenizer

    texts = json.loads((FIXTURE / "texts.json").read_text(encoding="utf-8"))
    names = sorted(p.name for p in (FIXTURE / "images").glob("*.png"))
    expected: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "seeds": SEEDS}
    expected["torchvision"] = torchvision
    for kind in SEEDS:
        folder = work / kind
        model_class = MODEL_CLASSES[json.loads((folder / "config.json").read_text())["model_type"]]
        _, info = model_class.from_pretrained(str(folder), output_loading_info=True)
        unused = [k for k in info["missing_keys"] + info["unexpected_keys"] if not k.endswith("position_ids")]
        if unused or info["mismatched_keys"] or info["error_msgs"]:
            sys.exit(f"rinna's {model_class.__name__} does not load {folder} cleanly: {info}")
        model, transform = ja_clip.load(str(folder), device="cpu")
        tokenizer = T5Tokenizer(vocab_file=str(folder / "tokenizer" / "spiece.model"), **T5_KWARGS)
        tokenizer.do_lower_case = True  # as rinna's load_tokenizer()
        pixels = torch.stack([transform(Image.open(FIXTURE / "images" / n)) for n in names])
        encodings = ja_clip.tokenize(texts, tokenizer=tokenizer, device="cpu")
        with torch.no_grad():
            image_features = model.get_image_features(pixels).numpy()
            text_features = model.get_text_features(**encodings).numpy()
        np.save(FIXTURE / f"{kind}_image_features.npy", image_features)
        np.save(FIXTURE / f"{kind}_text_features.npy", text_features)
        expected[kind] = {
            "weights_sha256": weights_sha256(folder / "pytorch_model.bin"),
            "input_ids": encodings["input_ids"].tolist(),
            "attention_mask": encodings["attention_mask"].tolist(),
            "position_ids": encodings["position_ids"][0].tolist(),
        }
    expected["images"] = {n: array_sha256(p.numpy()) for n, p in zip(names, pixels, strict=True)}
    expected["pixel_stats"] = {n: [float(p.mean()), float(p.std())] for n, p in zip(names, pixels, strict=True)}
    if spm is not None and captions is not None:
        expected["captions"] = caption_ids(spm, captions)
    (FIXTURE / "expected.json").write_text(json.dumps(expected, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}/expected.json and the feature .npy files")


def weights_sha256(path: Path) -> str:
    """sha256 over the sorted tensors of a pickled state dict (the test hashes its own state the same way)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        if key.endswith("position_ids"):
            continue
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(state[key].float().numpy()).tobytes())
    return digest.hexdigest()


def caption_ids(spm: Path, captions: Path) -> dict:
    """rinna's tokenize() of the shared captions with the real model: unpadded ids and a hash of the full rows."""
    import japanese_clip as ja_clip
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab_file=str(spm), **T5_KWARGS)
    tokenizer.do_lower_case = True
    lines = [line for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    encodings = ja_clip.tokenize(lines, tokenizer=tokenizer, device="cpu")
    ids, masks = encodings["input_ids"].numpy(), encodings["attention_mask"].numpy()
    unpadded = [row[: int(mask.sum())].tolist() for row, mask in zip(ids, masks, strict=True)]
    return {
        "spm_sha256": hashlib.sha256(spm.read_bytes()).hexdigest(),
        "count": len(lines),
        "input_ids_sha256": array_sha256(ids.astype(np.int64)),
        "attention_mask_sha256": array_sha256(masks.astype(np.int64)),
        "unpadded": unpadded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "rinna"])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the tiny hub-layout scorers")
    parser.add_argument("--spm", type=Path, help="rinna's google_sp.model (step rinna: caption ids)")
    parser.add_argument("--captions", type=Path, help="the shared captions file (step rinna: caption ids)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.work)
    else:
        run_rinna(args.work, args.spm, args.captions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
