"""Fine-tuning on tiny models: what each stage trains, bad data, shards, exact resume, 2 processes, serving."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from processes import assert_every_process_closed_its_group, with_exit_check
from repofiles import REPO, load_repo_module
from safetensors.torch import load_file

from jsd.manifest import verify_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.training.config import parse_config
from jsd.training.data import (
    BadRecord,
    ImageFolderSource,
    Position,
    RecordStream,
    TarShardSource,
    expand_braces,
)
from jsd.training.trainer import train

CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている", "富士山と雲", "東京の夜景", "桜の木", "雪の村", "青い車"]
TINY = ["--resolution", "64", "--train_batch_size", "2", "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]


# ------------------------------------------------------------------------------------------ helpers
def png_bytes(seed: int, size: tuple[int, int] = (72, 80)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, *, bad: bool = False) -> Path:
    """8 good images with captions; with ``bad``, 4 bad records too (one of each kind)."""
    root.mkdir(parents=True)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        (root / f"{i}.png").write_bytes(png_bytes(i))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}, ensure_ascii=False))
    if bad:
        (root / "corrupt.png").write_bytes(b"\x89PNG not an image")
        (root / "silent.png").write_bytes(png_bytes(99))
        lines += [
            json.dumps({"file_name": "missing.png", "text": "無い画像"}, ensure_ascii=False),
            json.dumps({"file_name": "corrupt.png", "text": "壊れた画像"}, ensure_ascii=False),
            json.dumps({"file_name": "silent.png", "text": "   "}),
            "{not json",
        ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tar_shards(root: Path, *, num_shards: int = 4, bad: bool = False) -> str:
    """WebDataset shards of 3 records each; returns the brace pattern naming them."""
    root.mkdir(parents=True)
    for s in range(num_shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for r in range(3):
                key, i = f"{s:03d}{r:03d}", s * 3 + r
                members = {f"{key}.png": png_bytes(i), f"{key}.txt": CAPTIONS[i % len(CAPTIONS)].encode()}
                if bad and (s, r) == (0, 1):
                    members[f"{key}.png"] = b"garbage"
                if bad and (s, r) == (1, 2):
                    del members[f"{key}.txt"]
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if bad:  # a truncated shard: its remaining records are lost, the run goes on
        shard = root / f"shard-{num_shards - 1:06d}.tar"
        shard.write_bytes(shard.read_bytes()[:700])
    return str(root / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / component).glob("*.safetensors")))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def served(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as the served layout holds them: floating point in fp16 (the tiny checkpoint is fp32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def dtypes(folder: Path, component: str) -> set[torch.dtype]:
    return {t.dtype for t in weights(folder, component).values() if t.is_floating_point()}


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(tmp_path: Path, checkpoint: Path, *args: str) -> Path:
    """Train in this process, on one thread: tiny tensors gain nothing from more, and CI shares its cores."""
    output = tmp_path / "out"
    config = parse_config(
        ["--pretrained_model_name_or_path", str(checkpoint), "--output_dir", str(output), *TINY, *args]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    return output


def child_env() -> dict[str, str]:
    quiet = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return with_exit_check(os.environ | quiet)


def train_cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), *TINY, "--report_to", "none", *args]


# ------------------------------------------------------------------------------------------ stages
def test_stage1_trains_only_the_text_encoder(tmp_path, tiny_checkpoint, fresh_accelerate):
    data = image_folder(tmp_path / "data")
    # the stage-1 file says text_encoder_init=scratch; the flag on the command line wins
    args = ["--config", str(REPO / "configs/train/stage1.json"), "--text_encoder_init", "pretrained"]
    args += ["--prediction_type", "v_prediction"]
    output = run_in_process(tmp_path, tiny_checkpoint, *args, "--train_data_dir", str(data), "--max_train_steps", "2")
    # trained for v-prediction: the served scheduler must sample with it
    assert json.loads((output / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert not same(weights(output, "text_encoder"), served(weights(tiny_checkpoint, "text_encoder")))
    assert same(weights(output, "unet"), served(weights(tiny_checkpoint, "unet")))
    assert same(weights(output, "vae"), served(weights(tiny_checkpoint, "vae")))
    assert all(dtypes(output, c) == {torch.float16} for c in ("text_encoder", "unet", "vae", "safety_checker"))

    # stage 2 starts from this fp16 output and still trains (and keeps its frozen VAE) in fp32
    from jsd.training.models import load_training_components

    stage2 = parse_config(["--pretrained_model_name_or_path", str(output), "--train_data_dir", "unused"])
    components = load_training_components(output, stage2)
    assert {p.dtype for c in ("text_encoder", "unet", "vae") for p in components[c].parameters()} == {torch.float32}


def test_cached_latents_learn_what_encoding_every_step_learns_with_each_picture_encoded_once(
    tmp_path, tiny_checkpoint, fresh_accelerate, monkeypatch
):
    """``--cache_latents``: each of the 8 pictures goes through the VAE once instead of at every step, and every
    step's loss is the one without the cache (the posterior is still sampled with the run's generator)."""
    from diffusers import AutoencoderKL

    from jsd.toyworld.build import read_losses

    data = image_folder(tmp_path / "data")
    encoded = []
    encode = AutoencoderKL.encode

    def counting(self, pixels, *args, **kwargs):
        encoded.append(len(pixels))
        return encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    common = ["--stage", "2", "--train_data_dir", str(data), "--max_train_steps", "8", "--checkpointing_steps", "8"]
    plain = run_in_process(tmp_path / "plain", tiny_checkpoint, *common)
    assert sum(encoded) == 16  # 8 steps of 2 pictures: two passes over the 8
    encoded.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cached = run_in_process(tmp_path / "cached", tiny_checkpoint, *common, "--cache_latents")
    assert sum(encoded) == 8
    losses = read_losses(plain.with_name("out-run"))
    assert len(losses) == 8 and len(set(losses)) > 1
    assert read_losses(cached.with_name("out-run")) == pytest.approx(losses, rel=1e-4)


def test_stage1_from_scratch_reinitialises_the_text_encoder(tiny_checkpoint):
    from jsd.training.models import load_training_components

    config = parse_config(
        [
            "--config",
            str(REPO / "configs/train/stage1.json"),
            "--pretrained_model_name_or_path",
            str(tiny_checkpoint),
            "--train_data_dir",
            "unused",
            "--seed",  # not 0: the tiny checkpoint itself was initialised with seed 0
            "5",
        ]
    )
    assert (config.stage, config.text_encoder_init, config.trained_modules) == (1, "scratch", ("text_encoder",))
    components = load_training_components(tiny_checkpoint, config)
    fresh = components["text_encoder"].state_dict()
    loaded = weights(tiny_checkpoint, "text_encoder")
    assert fresh.keys() >= loaded.keys()
    assert not any(torch.equal(fresh[k], loaded[k]) for k in loaded if "weight" in k and "norm" not in k)


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, tiny_checkpoint):
    """Stage 2 on a folder holding 4 bad records; the log is kept."""
    tmp = tmp_path_factory.mktemp("stage2")
    data = image_folder(tmp / "data", bad=True)
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        output = run_in_process(
            tmp,
            tiny_checkpoint,
            "--stage",
            "2",
            "--train_data_dir",
            str(data),
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--num_train_epochs",
            "1",
        )
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(old_level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return output, "\n".join(handler.lines)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_stage2_trains_text_encoder_and_unet_never_the_vae(stage2_run, tiny_checkpoint):
    output, _ = stage2_run
    assert not same(weights(output, "text_encoder"), served(weights(tiny_checkpoint, "text_encoder")))
    assert not same(weights(output, "unet"), served(weights(tiny_checkpoint, "unet")))
    assert same(weights(output, "vae"), served(weights(tiny_checkpoint, "vae")))
    assert same(weights(output, "safety_checker"), served(weights(tiny_checkpoint, "safety_checker")))


def test_resuming_with_other_settings_is_refused(stage2_run, tiny_checkpoint, fresh_accelerate):
    output, _ = stage2_run
    args = ["--train_data_dir", str(output.parent / "data"), "--max_train_steps", "4", "--stage", "1"]
    args += ["--project_dir", str(output.parent / "out-run"), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"checkpoint-3 belongs to a different run \(`--stage` 2 -> 1\)"):
        run_in_process(output.parent / "other", tiny_checkpoint, *args)


def test_resuming_with_another_tokenizer_is_refused(stage2_run, tiny_checkpoint, fresh_accelerate):
    output, _ = stage2_run
    tokenizer = tiny_checkpoint / "tokenizer"  # the same vocabulary size: only the resume check can refuse it
    args = ["--train_data_dir", str(output.parent / "data"), "--max_train_steps", "4", "--tokenizer_name"]
    args += [str(tokenizer), "--project_dir", str(output.parent / "out-run"), "--resume_from_checkpoint", "latest"]
    expected = rf"checkpoint-3 belongs to a different run \(`--tokenizer_name` None -> {re.escape(str(tokenizer))}\)"
    with pytest.raises(ValueError, match=expected):
        run_in_process(output.parent / "other", tiny_checkpoint, *args)


def test_a_new_run_refuses_a_project_dir_holding_checkpoints(stage2_run, tiny_checkpoint, fresh_accelerate):
    """Else it would prune the old run's checkpoints with its own, and `latest` would later resume the old run."""
    output, _ = stage2_run
    run_dir = output.parent / "out-run"
    before = sorted(p.name for p in run_dir.iterdir())
    args = ["--train_data_dir", str(output.parent / "data"), "--max_train_steps", "1", "--checkpoints_total_limit", "1"]
    expected = (
        rf"`--project_dir` {re.escape(str(run_dir))} already holds checkpoints of an earlier run "
        r"\(checkpoint-2, checkpoint-3\): pass `--resume_from_checkpoint latest` to continue it, "
        r"or choose another `--project_dir`"
    )
    with pytest.raises(ValueError, match=expected):
        run_in_process(output.parent, tiny_checkpoint, *args)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_bad_records_are_skipped_and_counted(stage2_run):
    output, log = stage2_run
    # the run read 3 steps × 2 images; the same stream, read alone, meets these bad records on the way
    data = output.parent / "data"
    stream = RecordStream(
        ImageFolderSource(data), resolution=64, random_flip=False, seed=0, rank=0, world_size=1, num_workers=0
    )
    samples = iter(stream)
    expected = sum(len(next(samples)["bad"]) for _ in range(6))
    assert expected >= 1  # seed 0 puts bad records before the 6th good one
    state = torch.load(output.parent / "out-run" / "checkpoint-3" / "training_state_0.pt", weights_only=True)
    assert sum(state["bad"]["counts"].values()) == expected
    assert f"Data at the end: {expected} bad records skipped" in log
    assert "Data by step 2:" in log


def test_output_serves(stage2_run):
    output, log = stage2_run
    verify_manifest(output)
    assert f"JSD_WEIGHTS={output}" in log
    # the weights are fp16, as served on a GPU; this CPU test computes in fp32
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(output, torch_dtype=torch.float32, use_safetensors=True)
    image = pipe(
        "海辺の夕日", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    assert list((output.parent / "out-run" / "logs").rglob("events.out.tfevents.*")), "no tensorboard log"


def test_the_predictor_loads_the_output(stage2_run, monkeypatch):
    pytest.importorskip("cog")
    output, _ = stage2_run
    predict = load_repo_module("predict.py", "predict_under_test")
    monkeypatch.setenv("JSD_WEIGHTS", str(output))
    predictor = predict.Predictor()
    predictor.setup()
    assert predictor.generator.model_revision == "stage2-step3"


def test_export_is_fp16_keeps_the_trained_module_and_replaces_the_folder_whole(
    tmp_path, tiny_checkpoint, monkeypatch, fresh_accelerate
):
    from accelerate import PartialState

    from jsd.loading import load_components
    from jsd.training import trainer

    PartialState()  # the trainer logs through accelerate's logger
    components = load_components(tiny_checkpoint, torch_dtype=torch.float32, load_safety_checker=False)
    unet = components["unet"]
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(1e-2)  # "trained"
    trained = {k: v.clone() for k, v in unet.state_dict().items()}

    def export() -> Path:
        return trainer.export_served(
            tiny_checkpoint, tmp_path / "served", {"unet": unet}, components["tokenizer"], source="t", revision="r"
        )

    output = export()
    verify_manifest(output)
    assert unet.dtype == torch.float32 and same(unet.state_dict(), trained)  # the training copy is untouched
    assert same(weights(output, "unet"), served(trained))
    assert same(weights(output, "vae"), served(weights(tiny_checkpoint, "vae")))
    assert all(dtypes(output, c) == {torch.float16} for c in ("text_encoder", "unet", "vae", "safety_checker"))

    # an export cut short leaves the previous folder whole, and its leftover where scripts/push.sh looks
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "write_manifest", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export()
    assert (tmp_path / ".served.staging").is_dir()
    verify_manifest(output)
    export()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]

    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = 1e6  # beyond fp16's range
    with pytest.raises(FloatingPointError, match=r"served was not written: unet weight conv_in.weight .* not finite"):
        export()
    verify_manifest(output)


def test_every_bad_record_kind_is_counted(tmp_path):
    """One pass over the folder meets each bad record once and says why it was skipped."""
    source = ImageFolderSource(image_folder(tmp_path / "data", bad=True))
    stream = RecordStream(source, resolution=64, random_flip=True, seed=0, rank=0, world_size=1, num_workers=0)
    samples = iter(stream)
    got = [next(samples) for _ in range(9)]  # the 8 good records of epoch 0, and the first of epoch 1
    reasons = [reason for s in got for _, reason in s["bad"]]
    for reason in ("missing image file", "unreadable image (UnidentifiedImageError)", "empty caption"):
        assert reason in reasons
    assert any(r.startswith("invalid metadata line") for r in reasons)
    assert sorted(s["text"] for s in got[:8]) == sorted(CAPTIONS)
    assert all(s["pixel_values"].shape == (3, 64, 64) and s["pixel_values"].abs().max() <= 1 for s in got)


def test_odd_metadata_and_unreadable_files_are_bad_records(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    (root / "locked.png").write_bytes(png_bytes(50))
    with open(root / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": 7, "text": "数字の名前"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"file_name": "locked.png", "text": "読めない画像"}, ensure_ascii=False) + "\n")
    read_bytes = Path.read_bytes

    def locked(path: Path) -> bytes:  # as root, chmod 000 would not stop the read
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", locked)
    stream = RecordStream(
        ImageFolderSource(root), resolution=64, random_flip=False, seed=0, rank=0, world_size=1, num_workers=0
    )
    samples = iter(stream)
    got = [next(samples) for _ in range(9)]  # the 8 good records of epoch 0, and the first of epoch 1
    reasons = [reason for s in got for _, reason in s["bad"]]
    assert "unreadable image file (PermissionError)" in reasons
    assert any(r.startswith("invalid metadata line (`file_name` 7 is not a string)") for r in reasons)
    assert len(set(reasons)) == 2 and sorted(s["text"] for s in got[:8]) == sorted(CAPTIONS)


def test_shard_json_that_is_not_an_object_is_a_bad_record(tmp_path):
    shard = tmp_path / "shard.tar"
    members = {"a.json": b'["a list"]', "b.json": b"\xff not utf-8", "c.json": '{"text": "猫"}'.encode()}
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            for member, payload in ((name.replace(".json", ".png"), png_bytes(0)), (name, data)):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    fetches = dict(TarShardSource([str(shard)]).records(0, 0, 0))
    with pytest.raises(BadRecord, match=r"invalid json \(a list, not an object\)"):
        fetches[f"{shard}:a"]()
    with pytest.raises(BadRecord, match="invalid json"):
        fetches[f"{shard}:b"]()
    assert fetches[f"{shard}:c"]()[1] == "猫"


# ------------------------------------------------------------------------------------------ data stream
def test_stream_splits_records_between_processes_and_workers(tmp_path):
    source = ImageFolderSource(image_folder(tmp_path / "data"))
    seen = []
    for rank in range(2):
        stream = RecordStream(source, resolution=64, random_flip=False, seed=3, rank=rank, world_size=2, num_workers=2)
        for worker in range(2):
            samples = stream._samples(worker, Position())
            seen += [next(samples)["text"] for _ in range(2)]  # 8 records / 4 streams = 2 each per epoch
    assert sorted(seen) == sorted(CAPTIONS)


def test_stream_resumes_exactly_from_a_position(tmp_path):
    source = TarShardSource([tar_shards(tmp_path / "shards")])
    stream = RecordStream(source, resolution=64, random_flip=True, seed=1, rank=0, world_size=1, num_workers=0)
    run = iter(stream)
    first = [next(run) for _ in range(14)]  # more than one epoch of 12 records
    resumed = RecordStream(source, resolution=64, random_flip=True, seed=1, rank=0, world_size=1, num_workers=0)
    resumed.resume({0: first[4]["position"]}, batches_done=5)
    rest = iter(resumed)
    for expected in first[5:]:
        got = next(rest)
        assert got["text"] == expected["text"] and torch.equal(got["pixel_values"], expected["pixel_values"])


def test_shards_stream_from_a_command_and_missing_shards_are_counted(tmp_path):
    tar_shards(tmp_path / "shards", num_shards=1)
    shard = tmp_path / "shards" / "shard-000000.tar"
    source = TarShardSource([f"pipe:cat {shard}", str(tmp_path / "shards" / "gone.tar")])
    keys = [key for key, _ in source.records(0, 0, 0)]
    assert keys == [f"pipe:cat {shard}:000{r:03d}" for r in range(3)]
    [(key, fetch)] = list(source.records(1, 0, 0))
    assert key.endswith("gone.tar")
    with pytest.raises(BadRecord, match="unreadable shard"):
        fetch()


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/shard-{000008..000011}.tar") == [f"d/shard-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_webdataset_shards_train_and_bad_records_are_counted(tmp_path, tiny_checkpoint, fresh_accelerate):
    pattern = tar_shards(tmp_path / "shards", bad=True)
    source = TarShardSource([pattern])
    stream = RecordStream(source, resolution=64, random_flip=False, seed=0, rank=0, world_size=1, num_workers=0)
    samples = iter(stream)
    epoch = [next(samples) for _ in range(8)]  # 12 records - corrupt image, no caption, 2 lost in the cut shard
    reasons = sorted(reason.split(" (")[0] for s in epoch for _, reason in s["bad"])
    assert "no caption" in " ".join(reasons) and "unreadable image" in reasons
    assert any("unreadable shard" in r for r in reasons)

    output = run_in_process(tmp_path, tiny_checkpoint, "--train_shards", pattern, "--max_train_steps", "2")
    verify_manifest(output)
    assert not same(weights(output, "unet"), served(weights(tiny_checkpoint, "unet")))


def test_bad_settings_are_rejected_with_the_flag_named(tmp_path, tiny_checkpoint):
    base = ["--pretrained_model_name_or_path", str(tiny_checkpoint), "--train_data_dir", "d"]
    with pytest.raises(SystemExit):
        parse_config([*base, "--stage", "3"])
    with pytest.raises(ValueError, match="--train_shards"):
        parse_config([*base, "--train_shards", "a.tar"])
    with pytest.raises(ValueError, match="--max_train_steps"):
        parse_config(["--pretrained_model_name_or_path", "x", "--train_shards", "a.tar"])
    with pytest.raises(ValueError, match="--resolution"):
        parse_config([*base, "--resolution", "60"])
    with pytest.raises(ValueError, match="learnin_rate"):
        bad = tmp_path / "typo.json"
        bad.write_text('{"learnin_rate": 1}')
        parse_config([*base, "--config", str(bad)])


# ------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_checkpoint):
    """SIGKILL after the first checkpoint, resume from latest: the weights equal an uninterrupted run's."""
    data = image_folder(tmp_path / "data")
    common = [
        "--pretrained_model_name_or_path", str(tiny_checkpoint), "--train_data_dir", str(data),
        "--max_train_steps", "6", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
        "--dataloader_num_workers", "3", "--random_flip", "--caption_dropout", "0.5", "--use_ema",
        "--lr_scheduler", "linear",
    ]  # fmt: skip
    # the uninterrupted run, in this process with one thread like the children (bitwise the same maths)
    try:
        reference = run_in_process(tmp_path / "reference", tiny_checkpoint, *common)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    output, log = tmp_path / "killed", tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            train_cli(*common, "--output_dir", str(output)), env=child_env(), stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (tmp_path / "killed-run" / "checkpoint-2").is_dir() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data-loading workers
        proc.wait()
    assert not output.exists(), "the run finished before it was killed"

    resumed = subprocess.run(
        train_cli(*common, "--output_dir", str(output), "--resume_from_checkpoint", "latest"),
        env=child_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    for component in ("text_encoder", "unet"):
        assert same(weights(output, component), weights(reference, component)), component
    # the fp32 training state too (the served layout is an fp16 cast of it)
    final_states = sorted((tmp_path / "reference" / "out-run" / "checkpoint-6").glob("*.safetensors"))
    assert final_states
    for state in final_states:
        assert same(load_file(tmp_path / "killed-run" / "checkpoint-6" / state.name), load_file(state)), state.name
    verify_manifest(output)


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path, tiny_checkpoint):
    pattern = tar_shards(tmp_path / "shards", num_shards=4)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "scripts" / "train.py"), *TINY, "--report_to", "none", "--stage", "2",
        "--pretrained_model_name_or_path", str(tiny_checkpoint), "--train_shards", pattern,
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "1",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU with 2 processes" in result.stderr
    assert_every_process_closed_its_group(result.stderr)
    checkpoints = sorted(p.name for p in (tmp_path / "out-run").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-2"]  # --checkpoints_total_limit 1 pruned checkpoint-1
    assert {p.name for p in (tmp_path / "out-run" / "checkpoint-2").glob("training_state_*.pt")} == {
        "training_state_0.pt",
        "training_state_1.pt",
    }
    verify_manifest(tmp_path / "out")


def test_train_tokenizer_cli_keeps_rinnas_special_ids(tmp_path, tiny_checkpoint, fresh_accelerate, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS * 3), encoding="utf-8")
    metadata = image_folder(tmp_path / "data") / "metadata.jsonl"
    # the script's main() in this process (a child would spend most of its time importing torch)
    script = load_repo_module("scripts/train_tokenizer.py")
    argv = ["--captions", str(captions), str(metadata), "--vocab_size", "200", "--output", str(tmp_path / "tok")]
    assert script.main(argv) == 0
    assert "<unk>=0, <s>=1, </s>=2, [PAD]=3, [CLS]=4, [SEP]=5, [MASK]=6" in capsys.readouterr().out
    assert script.main([*argv[:-2], "--output", str(tmp_path / "none"), "--vocab_size", "3"]) == 2
    from jsd.tokenizer import JapaneseTokenizer

    tok = JapaneseTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok(["猫が寝ている"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and tok.eos_token_id == 2 and tok.pad_token_id == 3
    assert tok.decode(ids[0], skip_special_tokens=True) == "猫が寝ている"

    # stage 1 from scratch for the new vocabulary: the output ships that tokenizer and a text encoder sized for it
    output = run_in_process(
        tmp_path, tiny_checkpoint, "--config", str(REPO / "configs/train/stage1.json"), "--tokenizer_name",
        str(tmp_path / "tok"), "--train_data_dir", str(metadata.parent), "--max_train_steps", "1",
    )  # fmt: skip
    assert (output / "tokenizer/spiece.model").read_bytes() == (tmp_path / "tok/spiece.model").read_bytes()
    config = json.loads((output / "text_encoder/config.json").read_text())
    assert (
        config["vocab_size"]
        == tok.vocab_size
        != json.loads((tiny_checkpoint / "text_encoder/config.json").read_text())["vocab_size"]
    )
