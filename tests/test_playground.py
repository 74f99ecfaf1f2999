"""The playground's parts that need no browser: the form from a schema, progress from logs, the mask from a
painted layer, the token report, languages, and one-line errors for a bad ``--api`` (``make test`` runs these;
the browser tests are in tests/playground/, run by ``make playground-test``)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from jsd.coghttp.fake import FakeCogServer, Request
from jsd.playground import i18n
from jsd.playground.cog_api import Outcome, is_loopback, step_of
from jsd.playground.form import SchemaError, input_fields, request_inputs

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
