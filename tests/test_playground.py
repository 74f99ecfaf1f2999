"""The playground's parts that need no browser: the form from a schema, progress from logs, the mask from a
painted layer, the token report, languages, and one-line errors for a bad ``--api`` (``make test`` runs these;
the browser tests are in tests/playground/, run by ``make playground-test``)."""

from __future__ import annotations

import http.server
import io
import json
import threading

import pytest
from PIL import Image

from jsd.coghttp.fake import FakeCogServer, Request
from jsd.playground import i18n
from jsd.playground.cog_api import Outcome, is_loopback, step_of
from jsd.playground.form import Field, SchemaError, input_fields, request_inputs

gr = pytest.importorskip("gradio")  # the playground extra (make venv installs it)

SCHEMA = {
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "properties": {
                    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "nullable": True, "x-order": 2},
                    "prompt": {"type": "string", "maxLength": 2000, "default": "猫", "x-order": 0},
                    "width": {"allOf": [{"$ref": "#/components/schemas/width"}], "default": 512, "x-order": 1},
                    "num_candidates": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1, "x-order": 3},
                    "image": {"type": "string", "format": "uri", "nullable": True, "x-order": 4},
                },
            },
            "width": {"type": "integer", "enum": [128, 512]},
        }
    }
}


def test_form_fields_follow_the_schema_in_order_with_bounds_and_choices():
    fields = {field.name: field for field in input_fields(SCHEMA)}

    assert list(fields) == ["prompt", "width", "seed", "num_candidates", "image"]
    assert fields["width"].kind == "choice" and fields["width"].choices == (128, 512)
    assert fields["seed"].big_integer and fields["seed"].bounds_text == "0–9,223,372,036,854,775,807"
    assert (fields["num_candidates"].minimum, fields["num_candidates"].maximum) == (1, 8)
    assert fields["image"].kind == "file" and fields["prompt"].max_length == 2000


def test_every_input_of_the_predictor_becomes_a_widget():
    from jsd.coghttp.local import openapi_schema
    from jsd.playground.app import widget

    fields = input_fields(openapi_schema())  # what coglet serves
    with gr.Blocks():
        widgets = {field.name: widget(field) for field in fields}
    assert {"prompt", "seed", "image", "mask", "num_inference_steps"} <= set(widgets)
    assert isinstance(widgets["seed"], gr.Textbox)  # a 63-bit seed does not survive a browser's number
    assert isinstance(widgets["num_inference_steps"], gr.Slider) and widgets["num_inference_steps"].maximum == 100
    assert isinstance(widgets["width"], gr.Dropdown)


@pytest.mark.parametrize(
    "document",
    [[], {"openapi": "3.0.2"}, {"components": {"schemas": {"Output": {}}}}, {"components": {"schemas": {"Input": {}}}}],
)
def test_a_document_without_input_properties_is_a_schema_error(document):
    with pytest.raises(SchemaError, match=r"components\.schemas\.Input|not a JSON object"):
        input_fields(document)


def test_request_inputs_convert_big_integers_and_leave_out_empty_optional_fields():
    fields = input_fields(SCHEMA)
    values = ["猫", 512, "9223372036854775807", 3.0, None]
    assert request_inputs(fields, values) == {
        "prompt": "猫",
        "width": 512,
        "seed": 2**63 - 1,
        "num_candidates": 3,
    }
    assert "seed" not in request_inputs(fields, ["猫", 512, "  ", 1, None])
    assert request_inputs(fields, ["猫", 512, "4.5", 1, None])["seed"] == "4.5"  # the server's 422 names it


def test_progress_is_the_last_step_of_the_logs_bar():
    logs = "Prompt tokens:\n...\r  0%|          | 0/10 [00:00<?, ?it/s]\r 30%|███       | 3/10 [00:01<00:02,  3.1s/it]"
    assert step_of(logs) == (3, 10)
    assert step_of("Loaded weights\n") is None


def test_errors_name_the_input_without_coglets_wrapping():
    invalid = Outcome(422, {"detail": [{"loc": ["body", "input", "seed"], "msg": "-1 is less than the minimum of 0"}]})
    assert invalid.error_text() == "`seed`: -1 is less than the minimum of 0"
    failed = Outcome(200, {"status": "failed", "error": "Prediction failed: Prediction failed: InputError: `mask` x"})
    assert failed.error_text() == "`mask` x" and not failed.succeeded


def test_painted_layer_becomes_a_white_on_black_mask():
    from jsd.playground.app import painted_mask

    layer = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 128), (10, 5, 20, 15))
    mask = Image.open(io.BytesIO(painted_mask([layer])))

    assert mask.mode == "L" and mask.size == (64, 32)
    assert mask.getbbox() == (10, 5, 20, 15) and {v for v, n in enumerate(mask.histogram()) if n} == {0, 255}
    assert painted_mask([Image.new("RGBA", (8, 8), (0, 0, 0, 0))]) is None
    assert painted_mask([]) is None


def test_token_report_shows_pieces_chunks_and_the_truncated_text():
    from jsd.playground.app import token_report

    metrics = {"prompt_tokens": 300, "prompt_chunks": 3, "prompt_truncated_tokens": 72, "prompt_truncated_text": "猫猫"}
    assert token_report(metrics, "en") == "Tokens: 300 pieces in 3 chunk(s). Truncated text: “猫猫” (72 pieces)"
    assert token_report(metrics | {"prompt_truncated_tokens": 0}, "ja").endswith("切り捨てなし。")
    assert token_report({}, "ja") == ""


@pytest.mark.parametrize(
    ("header", "lang"),
    [("ja,en-US;q=0.9", "ja"), ("ja-JP", "ja"), ("en-US,ja;q=0.5", "en"), ("fr", "en"), (None, "en")],
)
def test_japanese_for_a_japanese_browser_english_otherwise(header, lang):
    assert i18n.language(header) == lang


def test_every_message_exists_in_both_languages():
    assert set(i18n.MESSAGES["ja"]) == set(i18n.MESSAGES["en"])


def test_only_loopback_servers_get_the_webhook():
    assert is_loopback("http://127.0.0.1:5000") and is_loopback("http://localhost:5000")
    assert not is_loopback("https://example.com") and not is_loopback("http://gpu-box:5000")


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (404, b"<html>not found</html>", "answered HTTP 404: is this a Cog server?"),
        (200, b"<html>hello</html>", "is not JSON: is this a Cog server?"),
        (200, json.dumps({"openapi": "3.0.2", "paths": {}}).encode(), "not a Cog model's schema"),
    ],
)
def test_an_api_that_is_not_a_cog_model_is_one_error_line(status, body, needle, capsys):
    from jsd.cli import main

    with FakeCogServer(lambda request: (status, body)) as fake, pytest.raises(SystemExit) as exit_info:
        main(["playground", "--api", fake.url, "--port", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("jsd: error: ") and needle in err and err.count("\n") == 1, err


def test_an_api_where_nothing_listens_is_one_error_line(capsys):
    from jsd.cli import main

    with pytest.raises(SystemExit):
        main(["playground", "--api", "http://127.0.0.1:9", "--port", "0"])
    err = capsys.readouterr().err
    assert "jsd: error: --api http://127.0.0.1:9: no server answers" in err and err.count("\n") == 1, err


def test_without_api_outside_a_model_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    from jsd.cli import main
    from jsd.coghttp import local

    monkeypatch.setattr(local, "ROOT", tmp_path)  # an installed package run in a folder without predict.py
    with pytest.raises(SystemExit) as exit_info:
        main(["playground", "--port", "0", "--weights", str(tmp_path / "weights")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"no predict.py in {tmp_path}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "weights").exists()  # refused before writing a checkpoint


def _never_calls_the_webhook(request: Request) -> tuple[int, dict]:
    """A Cog-like server that accepts async predictions but never calls the webhook (a remote host)."""
    if request.path.endswith("/cancel"):
        return 200, {}
    if request.headers.get("Prefer") == "respond-async":
        return 202, {"status": "starting"}
    return 200, {"status": "succeeded", "output": [], "metrics": {"seeds": [1]}}


def test_a_server_that_never_calls_the_webhook_gets_the_prediction_canceled_and_sent_synchronously():
    from jsd.playground.cog_api import CogAPI, WebhookReceiver

    receiver = WebhookReceiver()
    with FakeCogServer(_never_calls_the_webhook) as fake:
        api = CogAPI(fake.url, webhook=receiver, webhook_probe=0.5)
        try:
            first = api.predict({"prompt": "猫"})
            second = api.predict({"prompt": "犬"})
        finally:
            receiver.close()

    assert first.succeeded and second.succeeded and api.webhook is None
    (async_path, prefer), (cancel_path, _), *sync = [(r.path, r.headers.get("Prefer")) for r in fake.requests]
    assert (async_path, prefer) == ("/predictions", "respond-async")
    assert cancel_path.startswith("/predictions/playground-") and cancel_path.endswith("/cancel")
    assert sync == [("/predictions", None), ("/predictions", None)]  # no second try of the webhook


# ---- a server that dies, waits, starts; cancel before the server takes the request ---------------------


class _ScriptedServer:
    """A Cog-like server on 127.0.0.1: ``/openapi.json`` answers 503 for the first ``starting`` calls, health says
    ``health``, and ``POST /predictions`` answers ``prediction_status`` (409: the slot is taken)."""

    def __init__(self, *, starting: int = 0, health: str = "READY", prediction_status: int = 409) -> None:
        self.starting, self.health, self.prediction_status = starting, health, prediction_status
        self.predictions = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/openapi.json":
                    server.starting -= 1
                    status, body = (503, {"detail": "starting"}) if server.starting >= 0 else (200, SCHEMA)
                else:
                    status, body = 200, {"status": server.health}
                self._answer(status, body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.endswith("/cancel"):
                    server.predictions += 1
                self._answer(server.prediction_status, {"status": "starting"})

            def _answer(self, status: int, body: dict) -> None:
                self.send_response(status)
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_starting_server_503_is_waited_for_and_said_once():
    from jsd.playground.cog_api import CogAPI

    fake = _ScriptedServer(starting=3, health="STARTING")
    lines = []
    try:
        schema = CogAPI(fake.url).schema_when_ready(30, log=lines.append, poll=0.01)
    finally:
        fake.close()
    assert schema == SCHEMA
    assert len(lines) == 1 and "is starting (STARTING); waiting" in lines[0], lines


def test_a_server_that_stays_starting_is_one_error_after_the_timeout():
    from jsd.playground.cog_api import CogAPI, PlaygroundError

    fake = _ScriptedServer(starting=10**6, health="STARTING")
    try:
        with pytest.raises(PlaygroundError, match=r"still starting \(STARTING\) after 0 s"):
            CogAPI(fake.url).schema_when_ready(0, log=lambda line: None, poll=0.01)
    finally:
        fake.close()


def test_a_server_that_stops_answering_mid_run_is_server_gone():
    import queue

    from jsd.playground.cog_api import CogAPI, ServerGone

    api = CogAPI("http://127.0.0.1:9", heartbeat=0.01)  # nothing listens on port 9
    with pytest.raises(ServerGone, match="stopped answering"):
        api.next_event(queue.Queue(), started=True)


def test_a_server_idle_without_completing_our_prediction_restarted_and_lost_it():
    import queue

    from jsd.playground.cog_api import CogAPI, ServerGone

    fake = _ScriptedServer(health="READY")
    events = queue.Queue()
    try:
        with pytest.raises(ServerGone, match="restarted"):
            CogAPI(fake.url, heartbeat=0.01).next_event(events, started=True)
        fake.health = "BUSY"  # still running it: keep waiting, and take the event when it comes
        threading.Timer(0.2, events.put, [{"status": "succeeded"}]).start()
        assert CogAPI(fake.url, heartbeat=0.01).next_event(events, started=True) == {"status": "succeeded"}
    finally:
        fake.close()


@pytest.mark.parametrize("webhook", [False, True])
def test_cancel_while_waiting_for_the_servers_slot_sends_nothing_more(webhook):
    from jsd.playground.cog_api import CogAPI, WebhookReceiver

    fake = _ScriptedServer(prediction_status=409)  # another prediction holds the slot for as long as we wait
    receiver = WebhookReceiver() if webhook else None
    api = CogAPI(fake.url, webhook=receiver)
    waits, outcome = [], []
    try:
        thread = threading.Thread(
            target=lambda: outcome.append(api.predict({"prompt": "猫"}, session="b", on_wait=lambda: waits.append(1)))
        )
        thread.start()
        while not waits:
            threading.Event().wait(0.01)
        assert api.cancel("b")
        thread.join(timeout=10)
        sent = fake.predictions
        threading.Event().wait(0.3)
    finally:
        fake.close()
        if receiver:
            receiver.close()
    assert not thread.is_alive() and outcome[0].canceled
    assert fake.predictions == sent  # nothing sent after the cancel
    assert not api.cancel("b")  # done: nothing left to cancel


def test_a_long_value_in_a_422_is_cut_to_its_start():
    prompt = "猫" * 2500
    detail = [{"loc": ["body", "input", "prompt"], "msg": f'"{prompt}" is longer than 2000 characters'}]
    text = Outcome(422, {"detail": detail}).error_text()
    assert len(text) < 200 and text.startswith("`prompt`: ") and "longer than 2000" in text, text


def test_a_text_over_its_max_length_is_one_short_line_naming_the_input_before_anything_is_sent():
    from jsd.playground.app import check_lengths
    from jsd.playground.cog_api import PlaygroundError

    with pytest.raises(PlaygroundError) as error:
        check_lengths(input_fields(SCHEMA), {"prompt": "猫" * 2500}, "ja")
    assert (
        str(error.value)
        == "`prompt`: 2,500 文字あります。最大 2,000 文字までです(「猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫猫…」)。"
    )


# ---- Japanese: server errors, descriptions keyed by input name -------------------------------------------


@pytest.mark.parametrize(
    ("english", "japanese"),
    [
        (
            "`prompt` contains the control character U+0001 at position 1; the only control characters allowed "
            "are tab, newline and carriage return: remove it.",
            "`prompt` の 1 文字目に制御文字 U+0001 があります。",
        ),
        (
            "`width` × `height` × `num_outputs` = 1024×1024×4 = 4,194,304 pixels exceeds the budget of 2,359,296 "
            "pixels per request (four 768×768 images on a 16 GB T4): lower `num_outputs`, `width` or `height`.",
            "4,194,304 ピクセルで、上限 2,359,296 ピクセルを超えています",
        ),
        ("`seed` must be between 0 and 9, got 12.", "`seed` は 0 から 9 の範囲で指定してください(入力値: 12)。"),
        ("`mask` could not be read as an image (PNG, JPEG or WebP expected): X", "`mask` を画像として読めません"),
        (
            "`lora_weights` something new",
            "入力 `lora_weights` の値が受け付けられませんでした: `lora_weights` something new",
        ),
    ],
)
def test_server_errors_read_in_japanese_and_stay_english_for_english(english, japanese):
    assert japanese in i18n.server_error("ja", english)
    assert i18n.server_error("en", english) == english


def test_inputs_without_a_japanese_description_are_listed_and_show_the_schemas_english():
    """Not a failure: an input new in predict.py shows its English description until its line is added."""
    import warnings

    from jsd.coghttp.local import openapi_schema
    from jsd.playground.app import widget

    fields = input_fields(openapi_schema())
    names = {field.name for field in fields}
    missing = sorted(names - set(i18n.FIELD_DESCRIPTIONS))
    unlabelled = sorted(names - set(i18n.FIELD_LABELS["ja"]))
    if missing or unlabelled:
        warnings.warn(
            f"inputs without a Japanese description (jsd/playground/i18n.py FIELD_DESCRIPTIONS): {missing}; "
            f"without a Japanese label (FIELD_LABELS): {unlabelled}",
            stacklevel=1,
        )
    print("inputs without a Japanese description:", missing or "none", "; without a label:", unlabelled or "none")
    assert not set(i18n.FIELD_DESCRIPTIONS) - names, "translations of inputs predict.py no longer has"
    new = Field(name="brand_new", kind="text", description="A new input.")
    with gr.Blocks():
        assert widget(new).info == "A new input."
        translated = widget(next(field for field in fields if field.name == "prompt"))
    assert str(translated.info) != fields[0].description  # keyed, translated in the browser


# ---- settings back from an image, the history ----------------------------------------------------------


def test_settings_from_a_file_take_each_fields_type_and_skip_what_does_not_fit():
    from jsd.coghttp.local import openapi_schema
    from jsd.playground.form import settings_values

    fields = input_fields(openapi_schema())
    embedded = {
        "prompt": "猫",
        "negative_prompt": "犬",
        "seed": "9223372036854775807",
        "width": "640",
        "height": "384",
        "num_inference_steps": "7",
        "guidance_scale": "3.5",
        "scheduler": "Euler",
        "lora_scale": "0.25",
        "prompt_weighting": "False",
        "model_revision": "abc",
        "image": "data:...",
    }
    values = settings_values(fields, embedded)
    assert values == {
        "prompt": "猫",
        "negative_prompt": "犬",
        "prompt_weighting": False,
        "width": 640,
        "height": 384,
        "num_inference_steps": 7,
        "guidance_scale": 3.5,
        "scheduler": "Euler",
        "seed": "9223372036854775807",
        "lora_scale": 0.25,
    }
    assert "width" not in settings_values(fields, {"width": "641"})  # not a choice the server offers
    assert settings_values(fields, {}) == {}


def test_a_history_entry_keeps_settings_seed_and_a_small_thumbnail_but_no_uploads(tmp_path):
    from jsd.playground.app import THUMBNAIL_PX, history_entry

    path = tmp_path / "out.png"
    Image.new("RGB", (512, 256), (10, 200, 30)).save(path)
    entry = history_entry({"prompt": "猫", "image": "data:image/png;base64,AAAA", "num_outputs": 2}, [(str(path), 7)])
    assert entry["settings"] == {"prompt": "猫", "num_outputs": 2, "seed": 7}
    thumb = Image.open(io.BytesIO(__import__("base64").b64decode(entry["thumbnail"].partition(",")[2])))
    assert max(thumb.size) == THUMBNAIL_PX and len(entry["thumbnail"]) < 8000
