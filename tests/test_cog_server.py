"""predict.py through the real Cog server (coglet) on 127.0.0.1, with a tiny seeded checkpoint.

One server for the whole module (starting it costs most of the time); every test leaves it READY.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece
from cogserver import cog_local, cog_server
from PIL import Image
from repofiles import REPO

from jsd.coghttp import client, local
from jsd.serving import read_metadata

pytestmark = pytest.mark.slow
FAST = {"width": 128, "height": 128, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with cog_server(tiny_checkpoint) as server:
        assert server.status == "READY", server.logs()[-3000:]
        yield server


def decode(uri: str) -> tuple[bytes, Image.Image]:
    payload = uri.partition(",")[2]
    data = base64.b64decode(payload)
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def assert_ready(server) -> None:
    assert server.settled_status() == "READY"


def test_setup_logs_have_no_deprecation_warnings_and_report_the_weights(server):
    logs = server.setup.get("logs", "") + server.logs()
    assert "deprecat" not in logs.lower()
    assert "revision tiny-seed0" in logs  # setup logged which weights it verified and loaded


def test_valid_request_returns_decodable_images_of_the_requested_size(server):
    status, body = server.predict(FAST | {"width": 192, "num_outputs": 2, "seed": 11, "prompt": "富士山 水彩"})

    assert status == 200 and body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 2
    for uri in body["output"]:
        assert uri.startswith("data:image/webp;base64,")
        _, image = decode(uri)
        assert image.format == "WEBP" and image.size == (192, 128)
    assert body["metrics"]["seeds"] == [11, 12]


def test_output_files_carry_the_settings(server, tmp_path):
    _, body = server.predict(FAST | {"seed": 5, "output_format": "png", "scheduler": "DDIM", "prompt": "猫 油絵"})

    assert body["status"] == "succeeded", body.get("error")
    data, _ = decode(body["output"][0])
    (tmp_path / "out.png").write_bytes(data)
    meta = read_metadata(tmp_path / "out.png")
    assert meta["prompt"] == "猫 油絵" and meta["seed"] == "5" and meta["scheduler"] == "DDIM"
    assert meta["num_inference_steps"] == "2" and meta["guidance_scale"] == "7.5"
    assert meta["model_revision"] == "tiny-seed0"


def test_consecutive_predictions_each_return_their_own_valid_images(server, tmp_path):
    # predict.py empties its one output folder when a prediction starts: coglet must have read the
    # previous prediction's files by then.
    first = server.predict(FAST | {"seed": 31, "num_outputs": 2, "output_format": "png"})[1]
    second = server.predict(FAST | {"seed": 32, "prompt": '夜の東京\n"雨"'})[1]

    assert first["status"] == second["status"] == "succeeded", (first.get("error"), second.get("error"))
    assert [decode(uri)[1].format for uri in first["output"] + second["output"]] == ["PNG", "PNG", "WEBP"]
    assert first["output"][0] != first["output"][1]
    (tmp_path / "second.webp").write_bytes(decode(second["output"][0])[0])
    assert read_metadata(tmp_path / "second.webp")["prompt"] == '夜の東京\n"雨"'


def test_same_seed_gives_the_same_bytes(server):
    request = FAST | {"seed": 1234, "output_format": "png"}
    first, second, other = (server.predict(r)[1] for r in (request, request, request | {"seed": 1235}))
    assert first["status"] == second["status"] == other["status"] == "succeeded"

    assert first["output"] == second["output"]
    assert first["output"] != other["output"]


def test_missing_seed_is_random_and_reported(server):
    seeds = [server.predict(FAST)[1]["metrics"]["seeds"][0] for _ in range(2)]
    assert seeds[0] != seeds[1]
    assert all(0 <= s < 2**63 for s in seeds)


def test_metrics_of_a_served_prediction_are_the_known_values(server, tiny_checkpoint):
    # Expected piece counts straight from sentencepiece (lower-cased, as rinna's tokenizer): a prompt of
    # one chunk, and one of more than 3 × 76 pieces with no word or punctuation boundary to cut at, so
    # the chunks hold exactly 76 pieces each and the rest is truncated.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer" / "spiece.model"))
    cases = [("富士山 水彩", 2, 40), ("猫" * 300, 1, 7)]
    for prompt, num_outputs, seed in cases:
        pieces = len(sp.encode(prompt.lower()))
        chunks = min(-(-pieces // 76), 3)
        start = time.monotonic()
        status, body = server.predict(FAST | {"prompt": prompt, "num_outputs": num_outputs, "seed": seed})
        elapsed = time.monotonic() - start

        assert status == 200 and body["status"] == "succeeded", body.get("error")
        metrics = body["metrics"]
        assert metrics["seeds"] == [seed + i for i in range(num_outputs)]
        assert metrics["nsfw_filtered"] == 0  # the tiny checkpoint never flags (test_predict.py flags one)
        assert (metrics["prompt_tokens"], metrics["prompt_chunks"]) == (pieces, chunks), prompt[:10]
        assert metrics["prompt_truncated_tokens"] == max(pieces - 3 * 76, 0)
        assert isinstance(metrics["inference_seconds"], float)
        assert 0 < metrics["inference_seconds"] < elapsed  # seconds, of this prediction
        assert metrics["predict_time"] >= metrics["inference_seconds"]
    assert metrics["prompt_truncated_tokens"] > 0  # the long prompt did overflow


def test_img2img_and_inpaint_accept_image_and_mask_data(server, tmp_path):
    picture = Image.new("RGB", (300, 200), (200, 40, 40))
    mask = Image.new("L", (300, 200), 0)
    mask.paste(255, (100, 50, 200, 150))

    cases = {"img2img": {"image": data_uri(picture)}, "inpaint": {"image": data_uri(picture, "JPEG")}}
    cases["inpaint"]["mask"] = data_uri(mask)
    for mode, inputs in cases.items():
        _, body = server.predict(FAST | {"width": 256, "seed": 3} | inputs)
        assert body["status"] == "succeeded", body.get("error")
        data, image = decode(body["output"][0])
        assert image.size == (256, 128)
        (tmp_path / f"{mode}.webp").write_bytes(data)
        assert read_metadata(tmp_path / f"{mode}.webp")["mode"] == mode  # the image (and mask) were used


@pytest.mark.parametrize(
    ("inputs", "name"),
    [
        ({"width": 100}, "width"),
        ({"height": "tall"}, "height"),
        ({"num_outputs": 9}, "num_outputs"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": "x"}, "guidance_scale"),
        ({"scheduler": "Karras?"}, "scheduler"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "あ" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"prompt_strength": 1.5}, "prompt_strength"),
        ({"output_format": "gif"}, "output_format"),
        ({"disable_safety_checker": "maybe"}, "disable_safety_checker"),
    ],
)
def test_schema_violations_get_422_naming_the_input(server, inputs, name):
    status, body = server.predict(FAST | inputs)

    assert status == 422, body
    assert any(d["loc"][-1] == name for d in body["detail"]), body
    assert_ready(server)


BROKEN = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ({"width": 1024, "height": 1024, "num_outputs": 4}, "`num_outputs`"),
        ({"image": BROKEN}, "`image` could not be read as an image"),
        ({"image": data_uri(Image.new("RGB", (64, 64))), "mask": BROKEN}, "`mask` could not be read as an image"),
        ({"mask": data_uri(Image.new("L", (64, 64)))}, "`mask` was given without `image`"),
        ({"image": data_uri(Image.new("RGB", (64, 64))), "prompt_strength": 0.1}, "`prompt_strength`"),
        ({"prompt": "猫\u0001犬"}, "`prompt` contains the control character U+0001 at position 1"),
    ],
)
def test_inputs_the_schema_cannot_judge_fail_the_prediction_naming_the_input(server, inputs, needle):
    start = time.monotonic()
    status, body = server.predict(FAST | inputs)

    assert status == 200 and body["status"] == "failed"
    assert needle in body["error"]
    assert time.monotonic() - start < 30  # rejected before any denoising
    assert_ready(server)


def test_malformed_body_is_rejected_and_the_server_stays_ready(server):
    status, _ = server.request("POST", "/predictions", None)
    assert status in (400, 422)
    status, _ = server.request("POST", "/predictions", {"input": "not an object"})
    assert status in (400, 422)
    assert_ready(server)


def test_busy_server_answers_409_and_cancel_ends_as_canceled(server):
    # Slow enough to cancel with the tiny model: 100 steps at 1024×768 (about a second per step here).
    slow = {"width": 1024, "height": 768, "num_inference_steps": 100, "seed": 9}
    with server.running("predictions", "slow-1", slow) as result:
        assert server.health()["status"] == "BUSY"
        # Cancel once the predictor runs: coglet is BUSY a moment before predict() starts, and a cancel that
        # lands in between can be lost (CI saw the 100 steps run on past the 120 s wait once, after a 200).
        deadline = time.monotonic() + 60
        while "with seeds [9]" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)

        busy_status, _ = server.predict(FAST, wait_if_busy=0)
        assert busy_status == 409

        cancel_status, _ = server.request("POST", "/predictions/slow-1/cancel")
        assert cancel_status == 200
    status, body = result["response"]
    assert status == 200 and body["status"] == "canceled"

    assert server.settled_status(timeout=30) == "READY"
    assert server.predict(FAST)[1]["status"] == "succeeded"


def test_cog_local_predict_writes_the_outputs_and_fails_loudly(server, tmp_path, capsys):
    Image.new("RGB", (200, 120), (20, 90, 160)).save(tmp_path / "in.png")
    args = ["predict", "--url", server.url, "-i", "width=192", "-i", "height=128", "-i", "num_inference_steps=2"]

    code = cog_local.main(
        [*args, "-i", "num_outputs=2", "-i", f"image=@{tmp_path / 'in.png'}", "-o", str(tmp_path / "o")]
    )
    assert code == 0
    written = sorted((tmp_path / "o").iterdir())
    assert [p.name for p in written] == ["metrics.json", "output.0.webp", "output.1.webp"]
    assert len(json.loads(written[0].read_text(encoding="utf-8"))["seeds"]) == 2  # the prediction's metrics
    assert Image.open(written[1]).size == (192, 128)

    assert (
        cog_local.main(
            [*args, "-i", "num_outputs=4", "-i", "width=1024", "-i", "height=1024", "-o", str(tmp_path / "bad")]
        )
        == 1
    )
    assert "`width` × `height` × `num_outputs`" in capsys.readouterr().err
    assert cog_local.main([*args, "-i", "guidance_scale=lots"]) == 1
    assert "guidance_scale" in capsys.readouterr().err


def test_cog_local_predict_builds_the_schema_once_and_serves_that_one(tmp_path, monkeypatch):
    # Building the schema imports the predictor (torch, diffusers): cog_local must not do it twice.
    schema = {"components": {"schemas": {"Input": {"properties": {"prompt": {"type": "string"}}}}}}
    built, sent = [], []
    monkeypatch.setattr(cog_local, "REPO", tmp_path)
    monkeypatch.setattr(local, "openapi_schema", lambda *args, **kwargs: built.append(args) or schema)
    monkeypatch.setattr(local.subprocess, "Popen", lambda *args, **kwargs: object())
    monkeypatch.setattr(local, "stop_server", lambda process: None)
    monkeypatch.setattr(client, "wait_for_setup", lambda url, process, timeout: {"status": "READY"})
    monkeypatch.setattr(cog_local, "_job_at", lambda url, inputs, args, train: sent.append(inputs) or 0)

    assert cog_local.main(["predict", "-i", "prompt=猫", "--weights", str(tmp_path / "weights")]) == 0
    assert len(built) == 1 and sent == [{"prompt": "猫"}]
    assert json.loads((tmp_path / ".cog" / "openapi_schema.json").read_text()) == schema


def test_wait_for_setup_without_time_left_raises_a_timeout():
    with pytest.raises(
        TimeoutError, match=r"did not finish setup within 0 s \(last health: \{'status': 'not polled'\}\)"
    ):
        client.wait_for_setup("http://127.0.0.1:9", None, 0)


def test_serve_stops_on_ctrl_c_with_one_line_and_no_traceback(tiny_checkpoint):
    # Ctrl+C in a terminal sends SIGINT to the foreground process group: here, cog_local's own group. Started with
    # SIGINT ignored, as a shell's `cmd &` (and some CI runners) start it: Ctrl+C must still stop it.
    port = client.free_port()
    command = [sys.executable, str(REPO / "scripts" / "cog_local.py"), "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--weights", str(tiny_checkpoint)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        state = client.wait_for_setup(f"http://127.0.0.1:{port}", process, 300)
        assert state["status"] == "READY", state
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "Stopped the server (Ctrl+C).", err
    assert client.health(f"http://127.0.0.1:{port}")["status"] == "UNREACHABLE"
