"""A toy Japanese CLIP, trained contrastively on the toy world and saved the way rinna saved theirs.

BERT text tower on rinna's tokenizer (``[CLS]`` first, as rinnakk/japanese-clip tokenizes) and a ViT
vision tower, both small (:func:`jsd.tiny.scorer_config` shapes, 64 px pictures in 16 px patches), trained
with CLIP's symmetric InfoNCE loss on the toy world's pictures and captions. :func:`save_hub_layout` writes
``config.json`` and a pickled ``pytorch_model.bin`` under transformers 4.x key names (rinna's hub layout,
:data:`jsd.japanese_clip.HUB_WEIGHTS_FILE`), plus ``tokenizer/``; ``scripts/download_weights.py --scorer``
converts that like the real one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from jsd.japanese_clip import (
    CONFIG_FILE,
    HUB_WEIGHTS_FILE,
    SCORER_FOLDER,
    TOKENIZER_SUBFOLDER,
    DualEncoder,
    preprocess,
    tokenize,
)
from jsd.manifest import write_manifest
from jsd.tiny import scorer_config
from jsd.tokenizer import JapaneseTokenizer, copy_notice
from jsd.toyworld import TOY_SOURCE_PREFIX
from jsd.toyworld.world import NEW_COLORS, Scene, all_scenes, corrupted, examples

IMAGE_SIZE = 64
PATCH_SIZE = 16


def toy_clip_config(vocab_size: int) -> dict:
    config = scorer_config("clip", size="tiny", vocab_size=vocab_size)
    config["vision_config"] |= {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    config["text_config"] |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return config


def scorer_scenes() -> list[Scene]:
    """Every scene, held-out combinations and the new color (:data:`~jsd.toyworld.world.NEW_COLORS`) included:
    the scorer knows every word, as rinna's CLIP knows words a fine-tuned model may still draw badly."""
    scenes = all_scenes()
    return scenes + [replace(s, color=new) for new in NEW_COLORS for s in scenes if s.color == "赤"]


def train_toy_clip(
    tokenizer_model: Path, *, steps: int = 400, batch_size: int = 64, seed: int = 0, progress=print
) -> tuple[DualEncoder, dict, list[float]]:
    """The trained model, its config and the loss of every step; data: fresh toy-world pictures per step.

    Each picture's caption also comes with a hard negative, the same caption with the color or the shape
    swapped (:func:`~jsd.toyworld.world.corrupted`; NegCLIP's idea): the distinction a data filter has to
    make, which plain in-batch negatives teach slowly."""
    tokenizer = JapaneseTokenizer(tokenizer_model)
    config = toy_clip_config(tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = DualEncoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    stream = examples(steps * batch_size, seed=seed + 100, scenes=scorer_scenes())
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        batch = [next(stream) for _ in range(batch_size)]
        negatives = [corrupted(item.scene, rng).caption(item.template, item.variant) for item in batch]
        pixels = torch.stack([preprocess(item.image, IMAGE_SIZE) for item in batch])
        image = F.normalize(model.get_image_features(pixels), dim=-1)
        texts = tokenize(tokenizer, [item.caption for item in batch] + negatives)
        text = F.normalize(model.get_text_features(**texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # batch × (captions + negatives)
        # pictures of the same scene are not negatives of each other's captions
        keys = [item.scene for item in batch]
        same = torch.tensor([[a == b for b in keys] for a in keys]) & ~torch.eye(len(batch), dtype=torch.bool)
        logits = logits.masked_fill(F.pad(same, (0, len(batch))), float("-inf"))
        target = torch.arange(len(batch))
        per_text = logits[:, : len(batch)].T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(per_text, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 6))
        if step % 25 == 0 or step == steps:
            progress(f"toy clip step {step}/{steps} loss {loss.item():.4f}")
    return model.eval(), config, losses


def save_hub_layout(model: DualEncoder, config: dict, tokenizer_model: Path, folder: Path) -> Path:
    """rinna's hub files: ``config.json``, ``pytorch_model.bin`` (4.x keys, ``position_ids`` kept) and tokenizer/."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.rinna_state_dict().items()}
    positions = model.text_config.max_position_embeddings
    state["text_model.embeddings.position_ids"] = torch.arange(positions).expand((1, -1)).clone()
    torch.save(state, folder / HUB_WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_dir = folder / TOKENIZER_SUBFOLDER
    JapaneseTokenizer(tokenizer_model).save_pretrained(tokenizer_dir)
    copy_notice(tokenizer_model, tokenizer_dir)
    return folder


def build_scorer(
    repo: Path,
    work: Path,
    dest: Path,
    tokenizer_model: Path,
    *,
    steps: int,
    seed: int,
    convert_script: Path,
    progress=print,
) -> dict:
    """Train the toy CLIP, save it in rinna's hub layout under ``work``, convert it into ``dest/japanese_clip``
    with ``convert_script --scorer`` (the caller passes ``download_weights.py``: brought in as a user brings in
    rinna's); returns its loss log."""
    import subprocess
    import sys

    hub = work / "japanese-clip-hub"
    shutil.rmtree(hub, ignore_errors=True)
    model, config, losses = train_toy_clip(tokenizer_model, steps=steps, seed=seed, progress=progress)
    save_hub_layout(model, config, tokenizer_model, hub)
    command = [sys.executable, str(convert_script), "--scorer", str(hub), "--dest", str(dest), "--force"]  # a rebuild
    progress(f"scorer: {' '.join(command[1:])}")
    subprocess.run(command, check=True, cwd=repo)
    scorer = dest / SCORER_FOLDER
    copy_notice(tokenizer_model, scorer / TOKENIZER_SUBFOLDER)  # the converter copies the model, not its notice
    # the converter recorded this machine's work folder as the source: say what it is instead
    write_manifest(scorer, source=f"{TOY_SOURCE_PREFIX}: the toy Japanese CLIP of scripts/train_toy.py, not rinna's",
                   revision=f"toy-clip-seed{seed}")  # fmt: skip
    return {"steps": steps, "seed": seed, "losses": losses}
