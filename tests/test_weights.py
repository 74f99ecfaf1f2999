"""Conversion of rinna's 2022 checkpoint to the served layout, and the checksum manifest serving verifies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from jsd import convert, manifest
from jsd.convert import ConversionError, UnsafePickleError, convert_checkpoint, select_files
from jsd.loading import load_components
from jsd.manifest import WeightsVerificationError, verify_manifest, write_manifest
from jsd.pipelines import JapaneseStableDiffusionPipeline
from jsd.tiny import write_2022_checkpoint

MODELS = ("unet", "vae", "text_encoder", "safety_checker")


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint's weights in rinna's 2022 layout. Read-only."""
    return write_2022_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("rinna2022") / "hub")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, old_checkpoint):
    """``old_checkpoint`` converted to the served layout. Read-only."""
    dest = tmp_path_factory.mktemp("served") / "weights"
    report = convert_checkpoint(old_checkpoint, dest, source="rinna/japanese-stable-diffusion", revision="0123abc")
    assert report.converted and not report.already_complete
    return dest


def test_the_2022_fixture_holds_the_key_names_and_configs_of_2022(old_checkpoint):
    """What diffusers 0.4.1 and transformers 4.22 saved (see jsd.tiny): a fixture with today's names proves nothing."""

    def keys(component: str, filename: str) -> dict[str, torch.Tensor]:
        return torch.load(old_checkpoint / component / filename, weights_only=True)

    def config(component: str) -> dict:
        return json.loads((old_checkpoint / component / "config.json").read_text())

    vae = keys("vae", "diffusion_pytorch_model.bin")
    for part in ("encoder", "decoder"):
        for name in ("group_norm", "query", "key", "value", "proj_attn"):  # diffusers 0.4's AttentionBlock
            assert f"{part}.mid_block.attentions.0.{name}.weight" in vae, (part, name)
    assert not [k for k in vae if ".to_q." in k or ".to_out." in k]
    text = keys("text_encoder", "pytorch_model.bin")
    assert all(k.startswith("text_model.") for k in text)
    assert text["text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    checker = keys("safety_checker", "pytorch_model.bin")
    assert "vision_model.vision_model.embeddings.position_ids" in checker
    assert "vision_model.vision_model.post_layernorm.weight" in checker and "concept_embeds_weights" in checker
    unet = keys("unet", "diffusion_pytorch_model.bin")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet  # unchanged since 0.4
    assert config("unet")["_diffusers_version"] == config("vae")["_diffusers_version"] == "0.4.1"
    assert set(config("vae")) == {
        "_class_name", "_diffusers_version", "in_channels", "out_channels", "down_block_types", "up_block_types",
        "block_out_channels", "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    }  # fmt: skip
    assert "scaling_factor" not in config("vae") and "addition_embed_type" not in config("unet")
    assert {k for k in config("unet") if k.startswith("_")} == {"_class_name", "_diffusers_version"}
    for component in ("text_encoder", "safety_checker"):
        assert config(component)["transformers_version"].startswith("4.22") and "dtype" not in config(component)
    clip = config("safety_checker")  # transformers 4.22's CLIPConfig: *_config_dict beside full sub-configs
    assert clip["vision_config_dict"]["patch_size"] == clip["vision_config"]["patch_size"]
    assert clip["text_config_dict"]["hidden_size"] == clip["text_config"]["hidden_size"]
    assert clip["vision_config"]["max_length"] == 20  # a generation default every 2022 config carried
    scheduler = json.loads((old_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert "steps_offset" not in scheduler


class Evil:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- conversion


def test_converted_folder_is_the_served_layout_with_fp16_safetensors_only(converted):
    assert not list(converted.rglob("*.bin"))
    index = json.loads((converted / "model_index.json").read_text())
    assert index["tokenizer"] == ["jsd", "JapaneseTokenizer"]
    assert index["_diffusers_version"] != "0.4.1"
    scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["steps_offset"] == 1 and scheduler["_class_name"] == "PNDMScheduler"
    tokenizer = json.loads((converted / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "JapaneseTokenizer" and tokenizer["do_lower_case"] is True
    text_config = json.loads((converted / "text_encoder" / "config.json").read_text())
    assert text_config["dtype"] == "float16" and "torch_dtype" not in text_config
    for name in MODELS:
        (weights,) = (converted / name).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            assert dtypes == {"F16"}, f"{weights} holds {dtypes}"
            assert not any(k.endswith("position_ids") for k in f.keys())  # noqa: SIM118


def test_converted_weights_equal_the_originals_in_fp16_with_2022_key_names_mapped(converted, tiny_checkpoint):
    original = load_components(tiny_checkpoint, use_safetensors=True)
    served = load_components(converted, use_safetensors=True)
    for name in MODELS:
        want, got = original[name].state_dict(), served[name].state_dict()
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            expected = tensor.half() if tensor.is_floating_point() else tensor
            assert torch.equal(got[key], expected), f"{name}.{key}"


def test_converted_folder_verifies_records_its_source_and_serves_images(converted, tiny_checkpoint):
    recorded = verify_manifest(converted)
    assert (recorded["source"], recorded["revision"]) == ("rinna/japanese-stable-diffusion", "0123abc")
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(converted, use_safetensors=True, torch_dtype=torch.float32)
    reference = JapaneseStableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    assert pipe.tokenizer(["猫の油絵"]).input_ids == reference.tokenizer(["猫の油絵"]).input_ids
    image = pipe("猫の油絵", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_a_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path, old_checkpoint):
    source = shutil.copytree(old_checkpoint, tmp_path / "hub")
    marker = tmp_path / "pwned"
    evil = source / "text_encoder" / "pytorch_model.bin"
    torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2), "x": Evil(marker)}, evil)
    with pytest.raises(UnsafePickleError, match=r"text_encoder/pytorch_model\.bin.*(posix|os)\.system"):
        convert_checkpoint(source, tmp_path / "weights", source="hub", revision="r")
    assert not marker.exists()
    assert not (tmp_path / "weights").exists()


def test_truncated_pickle_is_named(tmp_path, old_checkpoint):
    source = shutil.copytree(old_checkpoint, tmp_path / "hub")
    vae = source / "vae" / "diffusion_pytorch_model.bin"
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"vae/diffusion_pytorch_model\.bin is not a readable .*truncated"):
        convert_checkpoint(source, tmp_path / "weights", source="hub", revision="r")


def test_a_git_lfs_pointer_instead_of_weights_is_explained(tmp_path, old_checkpoint):
    source = shutil.copytree(old_checkpoint, tmp_path / "clone")
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3438167536\n"
    (source / "unet" / "diffusion_pytorch_model.bin").write_text(pointer)
    with pytest.raises(ConversionError, match=r"unet/diffusion_pytorch_model\.bin is a git-lfs pointer.*git lfs pull"):
        convert_checkpoint(source, tmp_path / "weights", source="clone", revision="r")


def test_a_sharded_bin_checkpoint_converts_whole_and_a_lost_shard_is_named(tmp_path, old_checkpoint, tiny_checkpoint):
    source = shutil.copytree(old_checkpoint, tmp_path / "hub")
    folder = source / "text_encoder"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    dest = convert_checkpoint(source, tmp_path / "weights", source="hub", revision="r").dest
    want = load_components(tiny_checkpoint, use_safetensors=True)["text_encoder"].state_dict()
    got = load_components(dest, use_safetensors=True)["text_encoder"].state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].half()) for k in want)  # every tensor of both shards

    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ConversionError, match=r"index\.json lists pytorch_model-00002-of-00002\.bin, which is not in"):
        convert_checkpoint(source, tmp_path / "other", source="hub", revision="r")


def test_weights_of_another_architecture_are_refused_with_the_keys(tmp_path, old_checkpoint):
    source = shutil.copytree(old_checkpoint, tmp_path / "hub")
    unet = source / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(unet, weights_only=True)
    del state["conv_in.weight"]
    torch.save(state, unet)
    with pytest.raises(ConversionError, match=r"unet.*conv_in\.weight"):
        convert_checkpoint(source, tmp_path / "weights", source="hub", revision="r")


def test_an_interrupted_conversion_resumes_and_a_complete_one_is_a_no_op(tmp_path, monkeypatch, old_checkpoint):
    real = convert._convert_component
    calls = []

    def interrupted_at_unet(comp, *args):
        calls.append(comp)
        if comp == "unet" and calls.count("unet") == 1:
            raise KeyboardInterrupt
        return real(comp, *args)

    monkeypatch.setattr(convert, "_convert_component", interrupted_at_unet)
    dest = tmp_path / "weights"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(old_checkpoint, dest, source="hub", revision="r")
    assert not dest.exists()
    report = convert_checkpoint(old_checkpoint, dest, source="hub", revision="r")
    assert report.converted == ["unet"] and "text_encoder" in report.skipped
    verify_manifest(dest)
    calls.clear()
    again = convert_checkpoint(old_checkpoint, dest, source="hub", revision="r")
    assert again.already_complete and calls == []
    assert not list(tmp_path.glob(".weights.*"))


def test_a_truncated_stamp_starts_the_staging_over(tmp_path, old_checkpoint):
    # A kill while the stamp was written leaves half of it: the rerun must not fail on it forever.
    staging = tmp_path / ".weights.staging"
    (staging / "unet").mkdir(parents=True)
    (staging / "unet" / "config.json").write_text("{}")  # of an unknown conversion: not reused
    (staging / ".stamp.json").write_text('{"source": "hub", "revis')
    report = convert_checkpoint(old_checkpoint, tmp_path / "weights", source="hub", revision="r")
    assert "unet" in report.converted and report.skipped == []
    verify_manifest(tmp_path / "weights")
    assert not list(tmp_path.glob(".weights.*"))


def test_a_kill_between_the_manifest_and_the_swap_resumes_without_converting_again(
    tmp_path, monkeypatch, old_checkpoint
):
    real = convert.write_manifest

    def killed_after_writing(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "write_manifest", killed_after_writing)
    dest = tmp_path / "weights"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(old_checkpoint, dest, source="hub", revision="r")
    monkeypatch.setattr(convert, "write_manifest", real)
    report = convert_checkpoint(old_checkpoint, dest, source="hub", revision="r")
    assert report.converted == [] and set(MODELS) <= set(report.skipped)
    assert verify_manifest(dest)["revision"] == "r"
    assert not (dest / ".stamp.json").exists() and not list(tmp_path.glob(".weights.*"))


def _git(*args: str, cwd) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_local_revision_is_a_clone_s_commit_never_the_commit_of_a_repo_around_the_folder(tmp_path):
    project = tmp_path / "project"
    stage2 = project / "out" / "stage2"
    stage2.mkdir(parents=True)
    (project / "README.md").write_text("a project that trains")
    _git("init", "-q", cwd=project)
    _git("add", "README.md", cwd=project)
    _git("commit", "-q", "-m", "first", cwd=project)
    assert convert.local_revision(project) == _git("rev-parse", "HEAD", cwd=project)
    assert convert.local_revision(stage2) == "local"  # inside the repo, not a clone of these weights
    assert convert.local_revision(tmp_path / "elsewhere") == "local"
    # A folder's own manifest names its revision (a training export, a served folder).
    (stage2 / "manifest.json").write_text(
        json.dumps({"format": 1, "revision": "step-500", "files": {"a": {"size": 1, "sha256": "0"}}})
    )
    assert convert.local_revision(stage2) == "step-500"
    snapshot = tmp_path / "models--rinna--jsd" / "snapshots" / "f0e1d2c3"
    snapshot.mkdir(parents=True)
    assert convert.local_revision(snapshot) == "f0e1d2c3"


def test_dest_holding_something_else_is_kept_unless_forced(tmp_path, old_checkpoint, converted):
    dest = shutil.copytree(converted, tmp_path / "weights")
    with pytest.raises(ConversionError, match="holds rinna/japanese-stable-diffusion@0123abc, not other@r"):
        convert_checkpoint(old_checkpoint, dest, source="other", revision="r")
    (dest / "unet" / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"not a verified checkpoint .*unet/config\.json.*--force"):
        convert_checkpoint(old_checkpoint, dest, source="rinna/japanese-stable-diffusion", revision="0123abc")
    convert_checkpoint(old_checkpoint, dest, source="other", revision="r", force=True)
    assert verify_manifest(dest)["source"] == "other"


def test_select_files_prefers_safetensors_ignores_variants_and_names_what_is_missing():
    names = [
        "model_index.json",
        "japanese-stable-diffusion.ckpt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/config.json",
        "text_encoder/pytorch_model-00001-of-00002.bin",
        "text_encoder/pytorch_model-00002-of-00002.bin",
        "text_encoder/pytorch_model.bin.index.json",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "README.md",
    ]
    chosen = select_files(names)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert not {"unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors"} & set(chosen)
    assert {
        "text_encoder/pytorch_model.bin.index.json",
        "text_encoder/pytorch_model-00001-of-00002.bin",
        "text_encoder/pytorch_model-00002-of-00002.bin",
    } <= set(chosen)
    assert not {"japanese-stable-diffusion.ckpt", "README.md"} & set(chosen)
    with pytest.raises(ConversionError, match=r"lacks .*tokenizer/spiece\.model.*vae/"):
        select_files([n for n in names if not n.startswith(("vae/", "tokenizer/spiece"))])
    with pytest.raises(ConversionError, match=r"feature_extractor/preprocessor_config\.json"):
        select_files([*names, "safety_checker/config.json", "safety_checker/pytorch_model.bin"])


# --------------------------------------------------------------------------- manifest verification


@pytest.fixture
def served(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "weights")


def test_missing_manifest_is_named(served):
    (served / "manifest.json").unlink()
    with pytest.raises(WeightsVerificationError, match=r"weights/manifest\.json is missing"):
        verify_manifest(served)


def test_missing_truncated_and_altered_files_are_named(served):
    unet = served / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[:-1])
    with pytest.raises(WeightsVerificationError, match=rf"{unet} has {len(data) - 1} bytes.*truncated"):
        verify_manifest(served)
    unet.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(WeightsVerificationError, match=rf"{unet} does not match its sha256.*altered"):
        verify_manifest(served)
    unet.unlink()
    with pytest.raises(WeightsVerificationError, match=rf"{unet} is missing"):
        verify_manifest(served)


def test_blocks_locate_the_change_and_a_whole_file_hash_still_verifies(served, monkeypatch):
    monkeypatch.setattr(manifest, "BLOCK_SIZE", 1024)
    write_manifest(served, source="tiny", revision="r")
    recorded = json.loads((served / "manifest.json").read_text())
    vae = served / "vae" / "diffusion_pytorch_model.safetensors"
    assert len(recorded["files"]["vae/diffusion_pytorch_model.safetensors"]["blocks"]) == -(-vae.stat().st_size // 1024)
    verify_manifest(served)
    data = bytearray(vae.read_bytes())
    data[1500] ^= 0xFF
    vae.write_bytes(bytes(data))
    with pytest.raises(WeightsVerificationError, match=r"vae/diffusion_pytorch_model\.safetensors .*bytes 1024-2047"):
        verify_manifest(served)
    # A manifest without blocks (as first written) is checked file by file.
    for entry in recorded["files"].values():
        entry.pop("blocks")
    (served / "manifest.json").write_text(json.dumps(recorded))
    with pytest.raises(WeightsVerificationError, match=r"vae/diffusion_pytorch_model\.safetensors does not match"):
        verify_manifest(served)
    data[1500] ^= 0xFF
    vae.write_bytes(bytes(data))
    assert verify_manifest(served)["source"] == "tiny"


def test_an_unlisted_weights_file_is_refused_but_other_extras_are_not(served):
    (served / "README.md").write_text("notes")
    verify_manifest(served)
    stray = served / "text_encoder" / "pytorch_model.bin"
    stray.write_bytes(b"not verified")
    with pytest.raises(WeightsVerificationError, match=rf"{stray} is not listed"):
        verify_manifest(served)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: json.dumps(m | {"files": {}}), "lists no files"),
        (lambda m: json.dumps(m | {"format": 99}), "format 99"),
        (lambda m: json.dumps(m | {"files": {"../secret": {"size": 1, "sha256": "0"}}}), "not a path inside"),
        (lambda m: json.dumps(m | {"files": {"unet/config.json": {"sha256": "0"}}}), "lacks an integer size"),
        (lambda m: json.dumps(m | {"block_size": 0}), "block_size 0: expected a positive integer"),
        (lambda m: json.dumps(m | {"block_size": -1024}), "block_size -1024: expected a positive integer"),
        (lambda m: json.dumps(m | {"block_size": "64MiB"}), "block_size '64MiB': expected a positive integer"),
        (lambda m: json.dumps(m | {"block_size": 1.5}), "block_size 1.5: expected a positive integer"),
    ],
)
def test_malformed_manifests_are_refused(served, edit, message):
    path = served / "manifest.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(WeightsVerificationError, match=message):
        verify_manifest(served)


# --------------------------------------------------------------------------- serving


@pytest.mark.slow
def test_cog_server_reports_setup_failed_naming_the_altered_file(served):
    from cogserver import cog_server

    unet = served / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0x01
    unet.write_bytes(bytes(data))
    with cog_server(served) as server:
        assert server.status == "SETUP_FAILED"
        logs = server.setup.get("logs", "") + server.logs()
        assert "unet/diffusion_pytorch_model.safetensors does not match its sha256" in logs
        status, body = server.predict({"prompt": "猫"}, wait_if_busy=0)
        assert status == 503 and body["status"] == "failed"  # no prediction runs on unverified weights


@pytest.mark.gpu
def test_converted_fp16_weights_give_finite_images_on_cuda(converted):
    pipe = JapaneseStableDiffusionPipeline.from_pretrained(converted, use_safetensors=True, torch_dtype=torch.float16)
    images = pipe.to("cuda")("猫の油絵", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert np.isfinite(images).all() and images.std() > 0
