"""The Japanese CLIP scorer: parity with rinna's own code (fixture), tokenization, scores, bad folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jsd.japanese_clip import (
    SCORER_FOLDER,
    JapaneseCLIPScorer,
    ScorerError,
    preprocess,
    tokenize,
)
from jsd.manifest import verify_manifest
from jsd.tiny import write_tiny_scorer
from jsd.tokenizer import JapaneseTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "japanese_clip"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
TEXTS = json.loads((FIXTURE / "texts.json").read_text(encoding="utf-8"))
IMAGE_NAMES = sorted(p.name for p in (FIXTURE / "images").glob("*.png"))
CONTROL_TEXT = "犬[SEP]と</s>猫"  # the fixture's one text that spells control tokens


def _images() -> list[Image.Image]:
    return [Image.open(FIXTURE / "images" / name) for name in IMAGE_NAMES]


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _state_sha256(path: Path) -> str:
    """The fixture script's weights_sha256, over our model.safetensors."""
    state = load_file(path)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(state[key].float().numpy()).tobytes())
    return digest.hexdigest()


def _normalised(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


@pytest.fixture(scope="module", params=["clip", "cloob"])
def scorer_folder(request, tmp_path_factory) -> Path:
    seed = EXPECTED["seeds"][request.param]
    return write_tiny_scorer(tmp_path_factory.mktemp(request.param) / SCORER_FOLDER, kind=request.param, seed=seed)


# --------------------------------------------------------------------------- parity with rinna's code
def test_preprocessing_equals_rinnas_transform_bit_for_bit():
    """rinna's Resize/CenterCrop/RGB/ToTensor/Normalize (torchvision on PIL input) on six shapes and modes."""
    assert len(IMAGE_NAMES) == len(EXPECTED["images"]) == 6
    for name, image in zip(IMAGE_NAMES, _images(), strict=True):
        pixels = preprocess(image, 224)
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
        stats = EXPECTED["pixel_stats"][name]
        assert _array_sha256(pixels.numpy()) == EXPECTED["images"][name], (name, pixels.mean(), stats)


def test_features_equal_rinnas(scorer_folder):
    """Same tiny weights, rinna's layout: our features equal those rinna's CLIPModel/CLOOBModel computed."""
    kind = json.loads((scorer_folder / "config.json").read_text())["model_type"]
    expected = EXPECTED[kind]
    assert _state_sha256(scorer_folder / "model.safetensors") == expected["weights_sha256"], (
        "jsd.tiny.write_tiny_scorer no longer writes the fixture's weights: regenerate the fixture "
        "(tests/fixtures/japanese_clip/README.md)"
    )
    scorer = JapaneseCLIPScorer.from_pretrained(scorer_folder, device="cpu")
    assert scorer.model_type == kind
    encodings = tokenize(scorer.tokenizer, TEXTS)
    same = [i for i, text in enumerate(TEXTS) if text != CONTROL_TEXT]
    assert [encodings["input_ids"][i].tolist() for i in same] == [expected["input_ids"][i] for i in same]
    assert [encodings["attention_mask"][i].tolist() for i in same] == [expected["attention_mask"][i] for i in same]
    assert encodings["position_ids"][0].tolist() == expected["position_ids"]
    image_features = scorer.image_features(_images(), batch_size=4)  # two batches
    text_features = scorer.text_features(TEXTS, batch_size=4)
    rinna_images = _normalised(np.load(FIXTURE / f"{kind}_image_features.npy"))
    rinna_texts = _normalised(np.load(FIXTURE / f"{kind}_text_features.npy"))
    np.testing.assert_allclose(image_features.numpy(), rinna_images, atol=1e-5, rtol=0)
    np.testing.assert_allclose(text_features.numpy()[same], rinna_texts[same], atol=1e-5, rtol=0)


def test_text_spelling_a_control_token_stays_text_unlike_rinnas(tiny_scorer):
    """rinna's slow T5Tokenizer turns "[SEP]" written in a caption into the [SEP] id; ours keeps it text.

    The project's tokenizer contract (jsd/tokenizer.py): text never injects a control id. Only [CLS] (first)
    and [PAD] (after the text) are control ids in a scorer's input.
    """
    tokenizer = JapaneseCLIPScorer.from_pretrained(tiny_scorer).tokenizer
    (row,) = tokenize(tokenizer, [CONTROL_TEXT])["input_ids"].tolist()
    rinna_row = EXPECTED["clip"]["input_ids"][TEXTS.index(CONTROL_TEXT)]
    sep = tokenizer.convert_tokens_to_ids("[SEP]")
    assert sep in rinna_row and sep not in row
    controls = {i for i in row if tokenizer.sp_model.is_control(i)}
    assert controls == {tokenizer.convert_tokens_to_ids("[CLS]"), tokenizer.pad_token_id}


def test_tokenization_equals_rinnas_on_the_shared_captions(rinna_spiece, captions):
    """Our tokenizer + [CLS] equals japanese_clip.tokenize() with rinna/japanese-roberta-base's T5Tokenizer."""
    expected = EXPECTED["captions"]
    assert hashlib.sha256(rinna_spiece.read_bytes()).hexdigest() == expected["spm_sha256"]
    assert len(captions) == expected["count"] == 500
    encodings = tokenize(JapaneseTokenizer(rinna_spiece), captions)
    ids, mask = encodings["input_ids"].numpy(), encodings["attention_mask"].numpy()
    for caption, row, row_mask, want in zip(captions, ids, mask, expected["unpadded"], strict=True):
        assert row[: int(row_mask.sum())].tolist() == want, caption
    assert _array_sha256(ids.astype(np.int64)) == expected["input_ids_sha256"]
    assert _array_sha256(mask.astype(np.int64)) == expected["attention_mask_sha256"]


# --------------------------------------------------------------------------- scores
def test_score_is_100_times_the_clamped_cosine(tiny_scorer):
    scorer = JapaneseCLIPScorer.from_pretrained(tiny_scorer)
    images = _images()
    texts = [TEXTS[i % 3] for i in range(len(images))]  # repeated texts: encoded once, same result
    scores = scorer.score(images, texts, batch_size=4)
    assert scores.dtype == torch.float32 and scores.shape == (len(images),) and scores.device.type == "cpu"
    cosine = (scorer.image_features(images) * scorer.text_features(texts)).sum(-1)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0))
    # The tiny scorer's towers are correlated so that scores spread: distinct, inside (0, 100).
    assert len(set(scores.tolist())) == len(images)
    assert bool(((scores > 0) & (scores < 100)).all()), scores


def test_score_needs_one_text_per_image(tiny_scorer):
    scorer = JapaneseCLIPScorer.from_pretrained(tiny_scorer)
    with pytest.raises(ValueError, match="one text per image: got 2 images and 1 texts"):
        scorer.score(_images()[:2], ["猫"])
    assert scorer.score([], []).shape == (0,)


# --------------------------------------------------------------------------- bad folders
def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / SCORER_FOLDER))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ScorerError, match=rf"No Japanese CLIP scorer at {tmp_path / 'nowhere'}.*--scorer"):
        JapaneseCLIPScorer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), r"config.json is missing"),
        (lambda f: (f / "config.json").write_text("{"), r"config.json is not valid JSON"),
        (lambda f: (f / "config.json").write_text('{"model_type": "bert"}'), r"model_type 'bert'"),
        (lambda f: (f / "model.safetensors").unlink(), r"model.safetensors is missing"),
        (lambda f: shutil.rmtree(f / "tokenizer"), r"tokenizer .*cannot be read"),
    ],
    ids=["no-config", "bad-json", "wrong-type", "no-weights", "no-tokenizer"],
)
def test_damaged_folder_is_named_without_manifest(tiny_scorer, tmp_path, damage, message):
    folder = _copy(tiny_scorer, tmp_path)
    (folder / "manifest.json").unlink()  # what the loader itself checks, manifest aside
    damage(folder)
    with pytest.raises(ScorerError, match=message):
        JapaneseCLIPScorer.from_pretrained(folder)


def test_truncated_weights_are_named(tiny_scorer, tmp_path):
    folder = _copy(tiny_scorer, tmp_path)
    (folder / "manifest.json").unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ScorerError, match=rf"{weights} is not a readable safetensors file"):
        JapaneseCLIPScorer.from_pretrained(folder)


def test_weights_that_do_not_fit_the_config_are_named(tiny_scorer, tmp_path):
    folder = _copy(tiny_scorer, tmp_path)
    (folder / "manifest.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScorerError, match=r"model.safetensors does not fit config.json"):
        JapaneseCLIPScorer.from_pretrained(folder)


def test_rinnas_pickle_only_gets_the_conversion_hint(tmp_path):
    folder = write_tiny_scorer(tmp_path / "hub", layout="hub")
    with pytest.raises(ScorerError, match=r"pytorch_model.bin: convert it with .*download_weights.py --scorer"):
        JapaneseCLIPScorer.from_pretrained(folder)


def test_altered_file_fails_the_manifest(tiny_scorer, tmp_path):
    folder = _copy(tiny_scorer, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ScorerError, match=rf"{weights} does not match its sha256"):
        JapaneseCLIPScorer.from_pretrained(folder)


def test_a_scorer_inside_the_weights_is_its_own_checkpoint(tiny_checkpoint, tiny_scorer, tmp_path):
    """weights/japanese_clip/ has its own manifest: the main manifest neither lists nor refuses its files."""
    weights = Path(shutil.copytree(tiny_checkpoint, tmp_path / "weights"))
    shutil.copytree(tiny_scorer, weights / SCORER_FOLDER)
    manifest = verify_manifest(weights)
    assert not any(name.startswith(SCORER_FOLDER) for name in manifest["files"])
    verify_manifest(weights / SCORER_FOLDER)


def test_a_negative_cosine_scores_zero(tiny_scorer, tmp_path):
    """The text projection negated: every cosine flips sign, so every score is max(cos, 0) = 0."""
    from safetensors.torch import save_file

    folder = _copy(tiny_scorer, tmp_path)
    (folder / "manifest.json").unlink()
    state = load_file(folder / "model.safetensors")
    state["text_projection.weight"] = -state["text_projection.weight"]
    save_file(state, folder / "model.safetensors")
    images, texts = _images()[:3], TEXTS[:3]
    flipped = JapaneseCLIPScorer.from_pretrained(folder).score(images, texts)
    assert flipped.tolist() == [0.0, 0.0, 0.0]
    assert bool((JapaneseCLIPScorer.from_pretrained(tiny_scorer).score(images, texts) > 0).all())
