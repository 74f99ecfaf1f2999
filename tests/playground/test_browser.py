"""The playground in a real browser (headless Chromium, Playwright) against a real coglet with the tiny checkpoint.

Each test opens its own page; all share one coglet and one playground (conftest.py). The last test stops
the server, so it stays last in this file.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest
from PIL import Image

from jsd.coghttp import client
from jsd.serving import read_metadata

pytestmark = pytest.mark.browser

PROMPT = "サラリーマン 油絵"
FAST = {"prompt": PROMPT, "seed": 42, "num_inference_steps": 2, "width": 128, "height": 128}
DONE = re.compile(r"生成しました|Generated")


# ---- driving the form -------------------------------------------------------------------------------


def set_text(page, name: str, value: str) -> None:
    page.locator(f"#input-{name} textarea, #input-{name} input").first.fill(value)


def set_number(page, name: str, value) -> None:
    """A slider's number box: typed, then Enter (Gradio takes the value on change)."""
    box = page.locator(f"#input-{name} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page, name: str, value) -> None:
    page.locator(f"#input-{name} input").click()
    page.locator(f"#input-{name}").get_by_role("option", name=str(value), exact=True).click()


def fill(page, inputs: dict) -> None:
    for name, value in inputs.items():
        if name in ("width", "height", "scheduler", "output_format"):
            choose(page, name, value)
        elif name in ("num_inference_steps", "num_outputs", "guidance_scale", "prompt_strength"):
            set_number(page, name, value)
        else:
            set_text(page, name, str(value))


def generate(page, *, keys: bool = False) -> str:
    """Press Generate (or Ctrl+Enter in the prompt) and wait for this run's message; returns it."""
    message = page.locator("#message")
    before = message.inner_text()
    if keys:
        page.locator("#input-prompt textarea").press("Control+Enter")
    else:
        page.locator("#generate").click()
    page.wait_for_function(
        "before => { const t = document.querySelector('#message').innerText.trim(); return t && t !== before; }",
        arg=before.strip(),
    )
    return message.inner_text().strip()


def gallery_bytes(page) -> list[bytes]:
    """Each gallery image as the browser fetches it: the bytes behind its ``src``."""
    sources = [img.get_attribute("src") for img in page.locator("#gallery img").all()]
    return [page.request.get(src).body() for src in dict.fromkeys(sources)]  # a preview shows one image twice


def download_bytes(page) -> list[bytes]:
    return [page.request.get(a.get_attribute("href")).body() for a in page.locator("#downloads a[href]").all()]


def direct(server, inputs: dict) -> list[bytes]:
    """The same request sent straight to the server: the decoded bytes of its data URIs."""
    status, body = client.post_prediction(server.url, inputs)
    assert status == 200 and body["status"] == "succeeded", body
    return [base64.b64decode(uri.partition(",")[2]) for uri in body["output"]]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ---- the tests --------------------------------------------------------------------------------------


def test_page_loads_in_the_browsers_language_and_nothing_leaves_the_machine(open_page, output_dir):
    start = time.monotonic()
    ja = open_page("ja-JP")
    assert ja.locator("#generate").inner_text().strip() == "生成"
    assert "準備完了" in ja.locator("#server-status").inner_text()
    assert "プロンプト (prompt)" in ja.locator("#input-prompt").inner_text()
    ja.screenshot(path=output_dir / "page-ja.png")

    en = open_page("en-US")
    assert en.locator("#generate").inner_text().strip() == "Generate"
    assert "ready" in en.locator("#server-status").inner_text()
    en.screenshot(path=output_dir / "page-en.png")
    print(f"two pages loaded in {time.monotonic() - start:.1f} s")
    assert len(open_page.requests) > 10  # the pages' own requests were seen
    assert [url for url in open_page.requests if not url.startswith(("http://127.0.0.1", "data:", "blob:"))] == []


def test_every_schema_input_is_in_the_form(open_page, server):
    page = open_page("en-US")
    schema = client.fetch_schema(server.url)
    properties = schema["components"]["schemas"]["Input"]["properties"]
    for name, prop in properties.items():
        block = page.locator(f"#input-{name}")
        assert block.count() == 1, name
        if prop.get("description") and name not in ("image", "mask"):
            assert prop["description"].replace("`", "")[:30] in block.inner_text(), name
    assert "(1–100)" in page.locator("#input-num_inference_steps").inner_text()


def test_txt2img_image_is_the_servers_file_byte_for_byte(open_page, server, output_dir):
    page = open_page("ja-JP")
    fill(page, FAST)
    message = generate(page)

    assert DONE.search(message), message
    shown = gallery_bytes(page)
    assert len(shown) == 1
    assert page.locator("#gallery .caption-label").inner_text().strip() == "シード 42"
    expected = direct(server, FAST)
    assert [sha(b) for b in shown] == [sha(b) for b in expected]
    assert [sha(b) for b in download_bytes(page)] == [sha(b) for b in expected]
    assert re.search(r"トークン: \d+ ピース、1 チャンク。 切り捨てなし。", page.locator("#token-report").inner_text())
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=output_dir / "txt2img-ja.png")  # docs/playground.png is this one


def test_ctrl_enter_generates_and_a_random_seed_can_be_reused(open_page, server):
    page = open_page("en-US")
    fill(page, {k: v for k, v in FAST.items() if k != "seed"})
    assert DONE.search(generate(page, keys=True))
    caption = page.locator("#gallery .caption-label").inner_text().strip()
    seed = int(caption.removeprefix("seed "))
    first = gallery_bytes(page)

    page.locator("#gallery img").first.click()
    page.locator("#reuse-seed").click()
    page.wait_for_function(
        "s => document.querySelector('#input-seed textarea, #input-seed input').value === s", arg=str(seed)
    )
    assert DONE.search(generate(page))
    assert page.locator("#gallery .caption-label").first.inner_text().strip() == f"seed {seed}"
    assert gallery_bytes(page) == first  # the seed reproduces the image


def _upload_picture(page, tmp_path) -> None:
    picture = tmp_path / "photo.png"
    Image.new("RGB", (128, 128), (200, 40, 40)).save(picture)
    page.locator("#input-image input[type=file]").set_input_files(picture)
    page.wait_for_timeout(1000)


def test_img2img_from_an_upload(open_page, tmp_path):
    page = open_page("en-US")
    fill(page, FAST)
    _upload_picture(page, tmp_path)
    assert DONE.search(generate(page))
    result = tmp_path / "result.webp"
    result.write_bytes(download_bytes(page)[0])
    assert read_metadata(result)["mode"] == "img2img"


def test_inpainting_with_a_mask_painted_by_the_mouse(open_page, tmp_path, output_dir):
    page = open_page("en-US")
    fill(page, FAST)
    _upload_picture(page, tmp_path)
    page.locator("#input-image button[aria-label='Brush']").first.click()
    canvas = page.locator("#input-image canvas").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 30, y)
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(x - 30 + step * 5, y + step * 2)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.screenshot(path=output_dir / "inpaint-painted.png")
    assert DONE.search(generate(page))
    result = tmp_path / "result.webp"
    result.write_bytes(download_bytes(page)[0])
    assert read_metadata(result)["mode"] == "inpaint"


def test_bad_input_names_the_input_and_the_next_request_works(open_page, tmp_path, output_dir):
    page = open_page("ja-JP")
    fill(page, FAST | {"prompt": "猫\u0001犬"})
    message = generate(page)
    assert "prompt contains the control character U+0001" in message, message  # Markdown shows `prompt` as code
    assert "Traceback" not in page.content()

    fill(page, {"prompt": PROMPT, "width": 1024, "height": 1024, "num_outputs": 4})
    message = generate(page)
    assert "num_outputs" in message and "2,359,296" in message, message
    page.screenshot(path=output_dir / "bad-input-ja.png")

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    fill(page, {"width": 128, "height": 128, "num_outputs": 1})
    page.locator("#input-mask input[type=file]").set_input_files(notes)
    page.wait_for_timeout(1000)
    message = generate(page)
    assert message.count("\n") == 0 and message.startswith("mask: ") and "notes.txt" in message, message

    page.locator("#input-mask button[aria-label='クリア'], #input-mask button[aria-label='Clear']").first.click()
    assert DONE.search(generate(page))


def test_progress_bar_with_steps_then_cancel_leaves_the_server_ready(open_page, server, output_dir):
    page = open_page("ja-JP")
    fill(page, {"prompt": PROMPT, "seed": 7, "num_inference_steps": 10, "width": 1024, "height": 768})
    page.locator("#generate").click()
    progress = page.locator("#gallery .progress-text")
    progress.filter(has_text=re.compile(r"[1-9]/10")).wait_for()
    page.screenshot(path=output_dir / "progress-ja.png")
    assert page.locator("#gallery .progress-bar").count() == 1

    page.locator("#cancel").click()
    page.wait_for_function("document.querySelector('#message').innerText.includes('キャンセル')")
    assert server.settled_status() == "READY"


def test_a_stopped_server_is_reported_on_the_page(open_page, server, output_dir):
    page = open_page("ja-JP")
    server.stop()  # the last test: the session's server is gone after this
    message = generate(page)
    assert "接続できません" in message, message
    page.reload()
    page.wait_for_function("document.querySelector('#server-status')?.innerText.includes('接続できません')")
    page.screenshot(path=output_dir / "server-down-ja.png")
