"""LoRA pieces without a server: archive captions and limits, the LoRA file cache, the file format, resume."""

from __future__ import annotations

import base64
import io
import json
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback import LoopbackFiles
from PIL import Image
from safetensors.torch import load_file, save_file

from jsd.lora_weights import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, LoraCache, LoraError
from jsd.training import archive
from jsd.training.archive import DatasetError, prepare_dataset
from jsd.training.config import parse_config

CAPTIONS = ["赤い花の写真", "海辺の夕日", "猫が寝ている"]


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def metadata(root: Path) -> dict[str, str]:
    lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {entry["file_name"]: entry["text"] for entry in map(json.loads, lines)}


# ------------------------------------------------------------------------------------------ archives
def test_caption_sources_in_order_of_precedence_with_the_prefix(tmp_path):
    images = {f"set/{i}.png": png_bytes(i) for i in range(3)}
    jsonl = "\n".join(
        json.dumps({"file_name": f"{i}.png", "text": c}, ensure_ascii=False) for i, c in enumerate(CAPTIONS)
    )
    csv_text = "file_name,caption\n" + "".join(f"{i}.png,CSV {c}\n" for i, c in enumerate(CAPTIONS))
    txts = {f"set/{i}.txt": f"TXT {c}" for i, c in enumerate(CAPTIONS)}

    all_three = write_zip(
        tmp_path / "a.zip", images | txts | {"set/metadata.jsonl": jsonl, "set/captions.csv": csv_text}
    )
    report = prepare_dataset(all_three, tmp_path / "a", caption_prefix="sks犬")
    assert report.caption_source == "metadata.jsonl" and report.images_used == 3
    assert metadata(report.folder)["1.png"] == "sks犬 海辺の夕日"

    csv_and_txt = write_zip(
        tmp_path / "b.zip", images | txts | {"set/captions.csv": "\ufeff" + csv_text}
    )  # Excel's BOM
    report = prepare_dataset(csv_and_txt, tmp_path / "b")
    assert report.caption_source == "captions.csv" and metadata(report.folder)["2.png"] == "CSV 猫が寝ている"

    report = prepare_dataset(write_zip(tmp_path / "c.zip", images | txts), tmp_path / "c")
    assert report.caption_source == "txt" and metadata(report.folder)["0.png"] == "TXT 赤い花の写真"


def test_unusable_files_are_skipped_and_counted_the_rest_trains(tmp_path):
    files = {f"{i}.png": png_bytes(i) for i in range(2)} | {"0.txt": "猫", "1.txt": "犬"}
    files |= {"bad.png": b"\x89PNG nope", "bad.txt": "壊れた", "nocap.png": png_bytes(5), "notes.pdf": b"%PDF"}
    files |= {"__MACOSX/._0.png": b"junk", ".DS_Store": b"junk"}

    report = prepare_dataset(write_zip(tmp_path / "d.zip", files), tmp_path / "d")

    assert report.images_found == 4 and report.images_used == 2
    assert report.skipped["bad.png"].startswith("unreadable image")
    assert report.skipped["nocap.png"] == "no caption (txt)" and report.skipped["notes.pdf"] == "not an image"
    assert sorted(metadata(report.folder)) == ["0.png", "1.png"]  # macOS junk ignored, not trained on


def test_a_corrupt_image_is_reported_as_unreadable_captioned_or_not(tmp_path):
    files = {"0.png": png_bytes(0), "0.txt": "猫", "corrupt.png": b"\x89PNG nope", "also.png": b"\xff\xd8 nope"}
    files |= {"also.txt": "犬"}  # one corrupt image with a caption, one without

    report = prepare_dataset(write_zip(tmp_path / "c.zip", files), tmp_path / "c")

    assert report.skipped["corrupt.png"].startswith("unreadable image")  # not "no caption"
    assert report.skipped["also.png"].startswith("unreadable image")


def test_errors_name_the_users_file_not_cogs_temporary_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(archive.tempfile, "gettempdir", lambda: str(tmp_path))
    # cog/types.py URLPath.convert: NamedTemporaryFile(suffix=<the URL's file name>, or "file.zip" for a data URI)
    assert archive.upload_name(tmp_path / "tmpab_d1234my-photos.zip") == "my-photos.zip"
    assert archive.upload_name(tmp_path / "tmpfaokml3efile.zip") == ""  # a data URI: no name
    assert archive.upload_name(Path("/home/me/data.zip")) == "data.zip"  # the user's own path

    empty = write_zip(tmp_path / "tmpfaokml3efile.zip", {})
    with pytest.raises(DatasetError, match=r"^`input_images` is empty"):
        prepare_dataset(empty, tmp_path / "a", filename=archive.upload_name(empty))
    with pytest.raises(DatasetError, match=r"^`input_images` \(my-photos\.zip\) is empty"):
        prepare_dataset(empty, tmp_path / "b", filename="my-photos.zip")


def test_skipped_files_are_named_in_the_log_up_to_a_limit(caplog):
    skipped = {f"{i:02d}.png": "unreadable image (OSError)" for i in range(23)}
    with caplog.at_level("INFO", logger="jsd.test"):
        archive.log_skipped(skipped, logging.getLogger("jsd.test"), limit=20)

    assert caplog.messages[0] == "  skipped 00.png: unreadable image (OSError)"
    assert len(caplog.messages) == 21 and caplog.messages[19].startswith("  skipped 19.png")
    assert caplog.messages[20] == "  … and 3 more (all of them are listed in training.json)"


def test_over_the_file_count_or_file_size_limit_is_refused_naming_the_entry(tmp_path, monkeypatch):
    files = {f"{i}.png": png_bytes(i) for i in range(3)} | {f"{i}.txt": "猫" for i in range(3)}
    path = write_zip(tmp_path / "e.zip", files)
    monkeypatch.setattr(archive, "MAX_MEMBERS", 4)
    with pytest.raises(DatasetError, match=r"`input_images` \(e\.zip\) holds more than 4 entries.*'1\.txt'"):
        prepare_dataset(path, tmp_path / "e")

    monkeypatch.setattr(archive, "MAX_MEMBERS", 100)
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DatasetError, match=r"'0\.png' unpacks to more than 1,000 bytes"):
        prepare_dataset(path, tmp_path / "f")


def test_a_compressed_tar_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(3):
            data = b"\0" * (1 << 20)
            info = tarfile.TarInfo(f"{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match=r"`input_images` \(bomb\.tar\.gz\) expands more than 100×"):
        prepare_dataset(path, tmp_path / "g")


def test_windows_backslash_paths_are_paths_and_cannot_escape(tmp_path):
    ok = write_zip(tmp_path / "w.zip", {"set\\0.png": png_bytes(0), "set\\0.txt": "猫"})
    assert prepare_dataset(ok, tmp_path / "w").images_used == 1
    evil = write_zip(tmp_path / "x.zip", {"..\\..\\0.png": png_bytes(0)})
    # deep enough that `..\..\` from wherever the entries are unpacked still lands inside `jail`
    jail = tmp_path / "jail"
    with pytest.raises(DatasetError, match=r"escapes the archive's folder"):
        prepare_dataset(evil, jail / "a" / "b" / "x")
    assert not list(jail.rglob("*.png"))


# ------------------------------------------------------------------------------------------ the cache
def lora_bytes(seed: int, size: int = 64) -> bytes:
    tensor = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    path = Path(f"/tmp/jsd-test-lora-{seed}-{size}.safetensors")
    save_file({"unet.a.lora.down.weight": tensor}, path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def files():
    server = LoopbackFiles()
    yield server
    server.close()


def test_the_cache_keeps_at_most_max_files_least_recently_used_first(tmp_path, files):
    cache = LoraCache(tmp_path / "cache", max_files=2)
    urls = [files.add(f"/{i}.safetensors", lora_bytes(i)) for i in range(3)]
    first = cache.resolve(urls[0])
    cache.resolve(urls[1])
    cache.resolve(urls[0])  # used again: now the most recent
    cache.resolve(urls[2])

    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == sorted(
        [f"{first.sha256}.safetensors", f"{cache.resolve(urls[2]).sha256}.safetensors"]
    )
    assert files.hits["/0.safetensors"] == 1 and files.hits["/2.safetensors"] == 1


def test_the_cache_bounds_bytes_and_downloads(tmp_path, files):
    big = lora_bytes(0, size=4096)
    cache = LoraCache(tmp_path / "cache", max_bytes=len(big) + 10, max_download_bytes=len(big) + 10)
    cache.resolve(files.add("/a.safetensors", big))
    cache.resolve(files.add("/b.safetensors", lora_bytes(1, size=4096)))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    too_big = files.add("/c.safetensors", lora_bytes(2, size=8192))
    with pytest.raises(LoraError, match=r"`lora_weights` .*/c\.safetensors.* bytes"):
        cache.resolve(too_big)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("ftp://example.com/x.safetensors", "uses the scheme 'ftp'"),
        ("/nowhere/x.safetensors", "no such file"),
        ("data:application/octet-stream;base64," + base64.b64encode(b"not safetensors").decode(), "neither a trainer"),
        ("data:text/plain,hello", "without base64 data"),
    ],
)
def test_unusable_lora_weights_are_refused_by_name(tmp_path, value, needle):
    with pytest.raises(LoraError, match="`lora_weights`") as caught:
        LoraCache(tmp_path / "cache").resolve(value)
    assert needle in str(caught.value)


def test_http_errors_and_tars_without_a_lora_are_refused_by_name(tmp_path, files):
    cache = LoraCache(tmp_path / "cache")
    with pytest.raises(LoraError, match=r"`lora_weights` .*/missing\.tar.*HTTP 404"):
        cache.resolve(files.url("/missing.tar"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("other.safetensors")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(LoraError, match=r"a \.tar without a lora\.safetensors"):
        cache.resolve(files.add("/empty.tar", buffer.getvalue()))


def test_a_local_safetensors_is_used_where_it_is(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_bytes(3))
    lora = LoraCache(tmp_path / "cache").resolve(str(path))
    assert lora.path == path and not list((tmp_path / "cache").glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ format and trainer
def test_the_kohya_file_has_a1111_key_names_and_alpha_equal_to_the_rank(tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    from jsd.lora_weights import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, save_lora
    from jsd.tiny import text_encoder_config, unet_config

    unet = UNet2DConditionModel(**unet_config("tiny", 32))
    text_encoder = CLIPTextModel(text_encoder_config("tiny", 100))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGET_MODULES)))
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(TEXT_ENCODER_TARGET_MODULES)))
    save_lora(tmp_path, unet, text_encoder)

    kohya = load_file(tmp_path / KOHYA_WEIGHT_NAME)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    diffusers_keys = load_file(tmp_path / LORA_WEIGHT_NAME)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in diffusers_keys)
    assert len(kohya) == len(diffusers_keys) * 3 // 2  # an .alpha per down/up pair


def test_lora_settings_are_checked():
    base = ["--pretrained_model_name_or_path", "w", "--train_data_dir", "d"]
    with pytest.raises(ValueError, match=r"`--train_text_encoder` needs `--lora_rank`"):
        parse_config([*base, "--train_text_encoder"])
    with pytest.raises(ValueError, match=r"`--lora_rank`=0 must be a positive integer"):
        parse_config([*base, "--lora_rank", "0"])
    assert parse_config([*base, "--lora_rank", "8", "--train_text_encoder"]).trained_modules == ("unet", "text_encoder")


def test_a_lora_run_is_refused_under_fsdp_and_deepspeed_and_runs_under_ddp():
    from accelerate.utils import DistributedType

    from jsd.training.trainer import refuse_unsupported_sharding

    base = ["--pretrained_model_name_or_path", "w", "--train_data_dir", "d"]
    lora, full = parse_config([*base, "--lora_rank", "4"]), parse_config(base)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=r"`--lora_rank` 4 cannot run under (FSDP|DEEPSPEED).*DDP"):
            refuse_unsupported_sharding(sharded, lora)
        refuse_unsupported_sharding(sharded, full)  # a full fine-tune exports through the gathering branch
    for plain in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_unsupported_sharding(plain, lora)


def test_a_lora_run_resumes_from_its_adapter_only_checkpoint_to_the_same_weights(
    tmp_path, tiny_checkpoint, monkeypatch
):
    from test_train import image_folder

    from jsd.training import trainer
    from jsd.training.adapters import CHECKPOINT_FILE
    from jsd.training.lora_run import reset_accelerate
    from jsd.training.trainer import train

    steps_taken, real_loss = [], trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", lambda *args: steps_taken.append(1) or real_loss(*args))

    data = image_folder(tmp_path / "data")
    common = ["--pretrained_model_name_or_path", str(tiny_checkpoint), "--train_data_dir", str(data)]
    common += ["--resolution", "64", "--train_batch_size", "2", "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]
    common += ["--lora_rank", "4", "--train_text_encoder", "--report_to", "none", "--checkpointing_steps", "2"]

    def run(name: str, *args: str) -> dict[str, torch.Tensor]:
        steps_taken.clear()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(parse_config([*common, "--output_dir", str(tmp_path / name), *args]))
        finally:
            torch.set_num_threads(threads)
            reset_accelerate()
        return load_file(tmp_path / name / LORA_WEIGHT_NAME)

    whole = run("whole", "--max_train_steps", "3")
    run("split", "--max_train_steps", "2")  # "killed" right after checkpoint-2
    checkpoint = tmp_path / "split-run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix == ".safetensors") == [CHECKPOINT_FILE]
    resumed = run("split", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert len(steps_taken) == 1  # it resumed at step 2: a run from scratch would take 3 steps to the same weights

    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_training_output_folder_is_accepted_and_a_folder_without_the_lora_is_named(tmp_path):
    # scripts/train.py --lora_rank writes lora.safetensors, lora_kohya.safetensors and training.json into a folder
    run = tmp_path / "my-lora"
    run.mkdir()
    (run / LORA_WEIGHT_NAME).write_bytes(lora_bytes(4))
    (run / "training.json").write_text("{}", encoding="utf-8")
    lora = LoraCache(tmp_path / "cache").resolve(str(run))
    assert lora.path == run / LORA_WEIGHT_NAME
    (run / LORA_WEIGHT_NAME).unlink()
    with pytest.raises(LoraError) as caught:
        LoraCache(tmp_path / "cache").resolve(str(run))
    assert str(caught.value) == (
        f"`lora_weights` '{run}' is a folder without lora.safetensors: give the lora.safetensors (or the .tar) a "
        "LoRA training wrote."
    )
