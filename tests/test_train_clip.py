"""The Japanese CLIP in fine-tuning: ``--min_clip_score`` keeps low pairs from the trainer, validation images and
scores reach tensorboard, and a Replicate training (train.py) ships them in its .tar and training.json.

Tiny checkpoint with a tiny scorer in its ``japanese_clip/`` (the served layout); expected scores come from the
scorer's features, one pair at a time, not from the filter's code.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from repofiles import REPO, load_repo_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import CAPTIONS, TINY, image_folder, png_bytes

from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer
from jsd.training import trainer
from jsd.training.config import parse_config

PROMPTS = ["赤い花", "夜の海"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_checkpoint, tiny_scorer):
    folder = tmp_path_factory.mktemp("weights") / "weights"
    shutil.copytree(tiny_checkpoint, folder)
    shutil.copytree(tiny_scorer, folder / SCORER_FOLDER)
    return folder


@pytest.fixture(scope="module")
def scorer(tiny_scorer):
    return JapaneseCLIPScorer.from_pretrained(tiny_scorer)


def pair_score(scorer, image: Image.Image, text: str) -> float:
    cosine = (scorer.image_features([image.convert("RGB")]) @ scorer.text_features([text]).T).item()
    return 100 * max(cosine, 0.0)


def threshold_below(scores: dict, k: int) -> float:
    ordered = sorted(scores.values())
    return (ordered[k - 1] + ordered[k]) / 2


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory, weights, scorer):
    """5 steps of stage 2 on 8 pairs with --min_clip_score dropping 3, validation every 2 steps (and at 5)."""
    tmp = tmp_path_factory.mktemp("filtered")
    data = image_folder(tmp / "data")
    scores = {c: pair_score(scorer, Image.open(data / f"{i}.png"), c) for i, c in enumerate(CAPTIONS)}
    threshold = threshold_below(scores, 3)
    seen: list[str] = []
    original = trainer.batch_loss

    def recording(accelerator, config, components, batch, generator):
        seen.extend(batch["text"])  # the captions the loss is computed on
        return original(accelerator, config, components, batch, generator)

    args = ["--pretrained_model_name_or_path", str(weights), "--output_dir", str(tmp / "out"), *TINY]
    args += ["--train_data_dir", str(data), "--min_clip_score", repr(threshold), "--max_train_steps", "5"]
    args += ["--validation_prompts", *PROMPTS, "--validation_steps", "2", "--checkpointing_steps", "5"]
    trainer.batch_loss = recording
    try:
        trainer.train(parse_config(args))
    finally:
        trainer.batch_loss = original
        reset_accelerate()
    return {"tmp": tmp, "data": data, "scores": scores, "threshold": threshold, "seen": seen, "args": args}


def test_min_clip_score_keeps_the_low_pairs_from_the_trainer(filtered_run):
    scores, threshold = filtered_run["scores"], filtered_run["threshold"]
    kept = {c for c, s in scores.items() if s >= threshold}
    assert len(kept) == 5
    assert len(filtered_run["seen"]) == 10  # 5 steps × 2: two whole epochs of the 5 kept pairs
    assert set(filtered_run["seen"]) == kept  # every kept pair trained on, no dropped one


def test_the_dropped_pairs_are_listed_with_their_scores(filtered_run):
    folder = filtered_run["tmp"] / "out-run" / "clip_filter"
    dropped = [json.loads(line) for line in (folder / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = {c: s for c, s in filtered_run["scores"].items() if s < filtered_run["threshold"]}
    assert {d["text"]: d["clip_score"] for d in dropped} == pytest.approx(expected, abs=1e-3)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert (report["kept"], report["dropped"], report["data_dir"]) == (5, 3, str(filtered_run["data"]))
    assert (folder / "histogram.png").is_file()


def test_validation_images_and_scores_reach_tensorboard(filtered_run, scorer):
    run = filtered_run["tmp"] / "out-run"
    logs = run / "logs" / "jsd-finetune"  # --logging_dir / --tracker_project_name (accelerate's layout)
    assert list(logs.glob("events.out.tfevents*")), list(run.rglob("*"))
    accumulator = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("validation")] == [2, 4, 5]
    means = {e.step: e.value for e in accumulator.Scalars("validation/clip_score_mean")}
    assert sorted(means) == [2, 4, 5]
    last = run / "validation" / "step-5"
    images = [Image.open(last / f"{i:02d}.png").convert("RGB") for i in range(len(PROMPTS))]
    expected = [pair_score(scorer, image, prompt) for image, prompt in zip(images, PROMPTS, strict=True)]
    assert means[5] == pytest.approx(np.mean(expected), abs=1e-3)
    for i, value in enumerate(expected):
        assert accumulator.Scalars(f"validation/clip_score_{i:02d}")[-1].value == pytest.approx(value, abs=1e-3)
    # tensorboard's grid of the step-5 images holds the saved images, pixel for pixel
    grid = np.asarray(Image.open(io.BytesIO(accumulator.Images("validation")[-1].encoded_image_string)).convert("RGB"))
    side = images[0].width
    for i, image in enumerate(images):
        assert np.array_equal(grid[:, i * side : (i + 1) * side], np.asarray(image))
    info = json.loads((last / "validation.json").read_text(encoding="utf-8"))
    assert info["prompts"] == PROMPTS and info["seeds"] == [0, 1] and info["step"] == 5
    # the images changed while training (steps 2 and 5), at the same seeds
    first = np.asarray(Image.open(run / "validation" / "step-2" / "00.png"), dtype=int)
    assert np.abs(first - np.asarray(images[0], dtype=int)).max() > 0


def test_resuming_with_another_threshold_is_refused(filtered_run, weights):
    args = [*filtered_run["args"], "--min_clip_score", "0", "--max_train_steps", "6"]
    args += ["--resume_from_checkpoint", "latest"]
    try:
        with pytest.raises(ValueError, match=r"belongs to a different run \(`--min_clip_score` [0-9.]+ -> 0.0\)"):
            trainer.train(parse_config(args))
    finally:
        reset_accelerate()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--min_clip_score", "101"], "`--min_clip_score`=101 is outside 0-100"),
        (["--min_clip_score", "-0.5"], "`--min_clip_score`=-0.5 is outside 0-100"),
        (["--validation_steps", "0"], "`--validation_steps`=0 must be a positive integer"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, extra, needle):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"outside|positive") as err:
        parse_config([*base, *extra])
    assert needle in str(err.value)
    with pytest.raises(ValueError, match="`--min_clip_score` filters an image folder"):
        shards = ["--train_shards", "a.tar", "--max_train_steps", "1"]
        parse_config(["--pretrained_model_name_or_path", "x", *shards, "--min_clip_score", "20"])


def test_a_missing_scorer_stops_the_run_before_training(tmp_path, tiny_checkpoint):
    data = image_folder(tmp_path / "data")
    args = ["--pretrained_model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out"), *TINY]
    args += ["--train_data_dir", str(data), "--min_clip_score", "20", "--max_train_steps", "1"]
    try:
        with pytest.raises(ValueError, match=f"its japanese_clip/` {tiny_checkpoint / SCORER_FOLDER}: no Japanese"):
            trainer.train(parse_config(args))
    finally:
        reset_accelerate()
    assert not (tmp_path / "out").exists()


def damaged_copy(weights, tmp_path):
    """``weights`` with its scorer's config.json cut short."""
    folder = tmp_path / "damaged"
    shutil.copytree(weights, folder)
    config = folder / SCORER_FOLDER / "config.json"
    config.write_text(config.read_text(encoding="utf-8")[:40], encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", ["missing scorer", "damaged scorer", "no captions", "drops everything"])
def test_scripts_train_answers_bad_clip_input_with_one_line_and_no_empty_run_folder(
    case, tmp_path, tiny_checkpoint, weights, capsys
):
    data = image_folder(tmp_path / "data")
    checkpoint, threshold, needle = weights, "20", ""
    if case == "missing scorer":
        checkpoint, needle = tiny_checkpoint, f"`--pretrained_model_name_or_path {tiny_checkpoint}: its japanese_clip/`"
    elif case == "damaged scorer":
        checkpoint = damaged_copy(weights, tmp_path)
        needle = f"`--pretrained_model_name_or_path {checkpoint}: its japanese_clip/`"
    elif case == "no captions":
        (data / "metadata.jsonl").unlink()
        needle = f"`--train_data_dir` {data} has no metadata.jsonl"
    else:
        threshold, needle = "100", f"`--min_clip_score` 100 drops every pair of `--train_data_dir` {data}"
    args = ["--pretrained_model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out"), *TINY]
    args += ["--train_data_dir", str(data), "--min_clip_score", threshold, "--max_train_steps", "1"]
    args += ["--report_to", "none"]
    script = load_repo_module("scripts/train.py", "jsd_scripts_train_under_test")
    try:
        assert script.main(args) == 2
    finally:
        reset_accelerate()
    err = capsys.readouterr().err.strip()  # the scoring's progress bar, then the error
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    run = tmp_path / "out-run"
    if case == "drops everything":  # the message points at the scores: they stay
        assert (run / "clip_filter" / "report.json").is_file()
    else:
        assert not run.exists(), list(run.rglob("*"))


def test_validation_without_a_scorer_logs_images_and_says_so(tmp_path, tiny_checkpoint, caplog):
    data = image_folder(tmp_path / "data")
    args = ["--pretrained_model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out"), *TINY]
    args += [
        "--train_data_dir",
        str(data),
        "--max_train_steps",
        "1",
        "--validation_prompts",
        "猫",
        "--report_to",
        "none",
    ]
    try:
        with caplog.at_level(logging.INFO):
            trainer.train(parse_config(args))
    finally:
        reset_accelerate()
    assert "No Japanese CLIP at" in caplog.text and "validation images are logged without scores" in caplog.text
    info = json.loads((tmp_path / "out-run" / "validation" / "step-1" / "validation.json").read_text())
    assert info["clip_scores"] is None and (tmp_path / "out-run" / "validation" / "step-1" / "00.png").is_file()


# ------------------------------------------------------------------------------------------ Replicate (train.py)
def zip_of(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return buffer.getvalue()


def cog_train_module(monkeypatch):
    """train.py as coglet loads it (registered in sys.modules: its TrainingOutput model looks itself up there)."""
    spec = importlib.util.spec_from_file_location("cog_train_clip_under_test", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_replicate_training_ships_its_filter_and_last_validation(tmp_path, weights, scorer, monkeypatch, caplog):
    data = tmp_path / "images"
    data.mkdir()
    captions = CAPTIONS[:5]
    for i, caption in enumerate(captions):
        (data / f"{i}.png").write_bytes(png_bytes(i))
        (data / f"{i}.txt").write_text(caption, encoding="utf-8")
    (tmp_path / "data.zip").write_bytes(zip_of(data))
    scores = {c: pair_score(scorer, Image.open(data / f"{i}.png"), c) for i, c in enumerate(captions)}
    threshold = threshold_below(scores, 2)
    monkeypatch.setenv("JSD_WEIGHTS", str(weights))
    cog_train = cog_train_module(monkeypatch)
    (tmp_path / "output").mkdir()
    monkeypatch.setattr(cog_train, "_output_dir", lambda: tmp_path / "output")
    # Cog's own input checks are tested over HTTP (test_cog_train.py); 64 px keeps this one fast
    with caplog.at_level(logging.INFO):
        output = cog_train.train(
            input_images=tmp_path / "data.zip", caption_prefix="", max_train_steps=2, learning_rate=1e-3,
            lora_rank=4, train_text_encoder=False, resolution=64, train_batch_size=1, seed=0,
            min_clip_score=threshold, validation_prompts="猫が寝ている\n\n  富士山  \n",
        )  # fmt: skip
    with tarfile.open(output.weights) as tar:
        names = sorted(tar.getnames())
        info = json.load(tar.extractfile("training.json"))
        kept = [json.loads(line) for line in tar.extractfile("clip_filter/kept.jsonl").read().splitlines()]
        dropped_list = [json.loads(line) for line in tar.extractfile("clip_filter/dropped.jsonl").read().splitlines()]
        assert Image.open(io.BytesIO(tar.extractfile("clip_filter/histogram.png").read())).width > 0
        assert json.load(tar.extractfile("clip_filter/report.json"))["kept"] == 3
        shipped = [Image.open(io.BytesIO(tar.extractfile(f"validation/{i:02d}.png").read())) for i in range(2)]
    # the images trained on are the 3 kept, in the log and in training.json; the lists are named in the .tar
    assert {p["text"] for p in kept} == {c for c, s in scores.items() if s >= threshold}
    assert {p["text"] for p in dropped_list} == {c for c, s in scores.items() if s < threshold}
    assert info["data"]["images_used"] == 3 and info["data"]["images_dropped_by_clip_filter"] == 2
    assert "Training on" not in caplog.text and "Trained on 3 images" in caplog.text
    assert "Trained on the 3 of 5 images the Japanese CLIP filter kept" in caplog.text
    assert "histogram: in the output .tar: clip_filter/kept.jsonl" in caplog.text
    assert str(tmp_path) not in caplog.text.split("histogram:")[1].splitlines()[0]
    assert "validation/00.png" in names and "validation/01.png" in names and "lora.safetensors" in names
    assert info["settings"]["min_clip_score"] == threshold
    assert info["settings"]["validation_prompts"] == ["猫が寝ている", "富士山"]
    dropped = {p["text"]: p["clip_score"] for p in info["clip_filter"]["dropped_pairs"]}
    assert dropped == pytest.approx({c: s for c, s in scores.items() if s < threshold}, abs=1e-3)
    assert info["clip_filter"]["kept"] == 3
    validation = info["validation"]
    assert validation["step"] == 2 and validation["seeds"] == [0, 1]
    expected = [pair_score(scorer, image, p) for image, p in zip(shipped, validation["prompts"], strict=True)]
    assert validation["clip_scores"] == pytest.approx(expected, abs=1e-3)


def test_a_replicate_training_names_its_own_inputs_for_a_damaged_scorer_and_a_threshold_too_high(
    tmp_path, weights, monkeypatch
):
    from jsd.training.lora_run import LoraTrainingSettings, train_lora_archive

    data = tmp_path / "images"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS[:2]):
        (data / f"{i}.png").write_bytes(png_bytes(i))
        (data / f"{i}.txt").write_text(caption, encoding="utf-8")
    (tmp_path / "data.zip").write_bytes(zip_of(data))
    settings = LoraTrainingSettings(min_clip_score=100.0, max_train_steps=1, resolution=64)
    with pytest.raises(ValueError) as err:
        train_lora_archive(tmp_path / "data.zip", tmp_path / "out.tar", settings, base_model=weights)
    assert str(err.value).startswith("`min_clip_score` 100 drops every pair of `input_images` (highest score")
    assert "--" not in str(err.value) and "jsd-lora-" not in str(err.value)
    damaged = damaged_copy(weights, tmp_path)
    with pytest.raises(ValueError) as err:
        train_lora_archive(tmp_path / "data.zip", tmp_path / "out.tar", settings, base_model=damaged)
    message = str(err.value)
    assert message.startswith(f"`min_clip_score`'s scorer, the model weights' `japanese_clip/` {damaged}"), message
    assert "--pretrained_model_name_or_path" not in message
    assert not (tmp_path / "out.tar").exists()


def test_a_replicate_threshold_without_a_scorer_names_min_clip_score(tmp_path, tiny_checkpoint):
    from jsd.training.lora_run import LoraTrainingSettings, train_lora_archive

    settings = LoraTrainingSettings(min_clip_score=20.0, max_train_steps=1)
    with pytest.raises(ValueError, match="`min_clip_score` needs a Japanese CLIP scorer in the model's weights"):
        train_lora_archive(tmp_path / "absent.zip", tmp_path / "out.tar", settings, base_model=tiny_checkpoint)
