"""The playground's own cost: page load to a usable form, and a generation through the page against the same
request sent straight to Cog's API (one run, one server, the ratio printed).

    python benchmarks/bench_playground.py                    # tiny checkpoint, 3 rounds
    python benchmarks/bench_playground.py --weights weights/ --steps 25 --size 512

It starts ``python -m jsd playground`` *without* ``--api`` (so the playground starts its own coglet on a
free loopback port, as a user's first run does) and drives it in headless Debian Chromium (``/usr/bin/chromium``,
``make playground-test`` installs it). Each round, alternating: one generation clicked in the page (button
press to the gallery's message, so it includes the async request, the webhook's events, decoding the data
URI, Gradio's file serving and the browser's rendering) and one synchronous ``POST /predictions`` with the
same input to the same server. It prints the medians and the ratio; speed is not a test (docs/playground.md).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from playwright.sync_api import sync_playwright

    from jsd.coghttp import client
except ModuleNotFoundError as err:  # started by a Python without the project's packages
    from _venv import venv_hint  # this file's folder is sys.path[0]

    raise SystemExit(venv_hint(err)) from None
from _chromium import CHROMIUM_FLAGS  # this file's folder is sys.path[0]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 600_000  # one page load or generation on 2 busy cores, at most


def start_playground(weights: Path, port: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The playground on ``port`` with its own coglet; returns the process and the coglet URL it printed."""
    log = open(log_path, "w")  # noqa: SIM115 (read while the process writes it)
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "jsd", "playground", "--weights", str(weights), "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if (api := re.search(r"coglet at (http://127\.0\.0\.1:\d+): READY", text)) and "Playground on" in text:
            return process, api.group(1)
        if process.poll() is not None:
            raise SystemExit(f"the playground exited:\n{text[-2000:]}")
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the playground did not start within 600 s")


def page_load(browser, url: str) -> float:
    """Seconds from navigation to a usable form: Generate rendered and the server's state shown."""
    context = browser.new_context(locale="ja-JP")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("#generate:enabled")
    page.wait_for_function("document.querySelector('#server-status')?.innerText.includes('127.0.0.1')")
    seconds = time.perf_counter() - start
    context.close()
    return seconds


def through_page(page, settings: dict) -> float:
    before = page.locator("#message").inner_text().strip()
    start = time.perf_counter()
    page.locator("#generate").click()
    page.wait_for_function(
        "b => { const t = document.querySelector('#message').innerText.trim(); return t && t !== b; }", arg=before
    )
    page.wait_for_selector("#gallery img")
    seconds = time.perf_counter() - start
    message = page.locator("#message").inner_text()
    if "生成しました" not in message:
        raise SystemExit(f"the page's generation failed: {message}")
    return seconds


def fill(page, settings: dict) -> None:
    page.locator("#input-prompt textarea").fill(settings["prompt"])
    page.locator("#input-seed textarea, #input-seed input").first.fill(str(settings["seed"]))
    steps = page.locator("#input-num_inference_steps input[type=number]")
    steps.fill(str(settings["num_inference_steps"]))
    steps.press("Enter")
    for side in ("width", "height"):
        page.locator(f"#input-{side} input").click()
        page.locator(f"#input-{side}").get_by_role("option", name=str(settings[side]), exact=True).click()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a checkpoint folder (default: a tiny one, made here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    settings = {
        "prompt": "サラリーマン 油絵",
        "seed": 42,
        "num_inference_steps": args.steps,
        "width": args.size,
        "height": args.size,
    }
    with tempfile.TemporaryDirectory(prefix="jsd-bench-playground-") as tmp:
        weights = Path(args.weights) if args.weights else Path(tmp) / "weights"
        if not args.weights:
            from jsd.tiny import make_checkpoint

            make_checkpoint(weights)
        port = client.free_port()
        process, api = start_playground(weights, port, Path(tmp) / "playground.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS
                )
                url = f"http://127.0.0.1:{port}"
                loads = [page_load(browser, url) for _ in range(args.rounds)]
                page = browser.new_page(locale="ja-JP")
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                page.wait_for_selector("#generate:enabled")
                fill(page, settings)
                through_page(page, settings)  # warm-up: the first prediction pays for lazy imports
                client.post_prediction(api, settings)
                ui, direct = [], []
                for _ in range(args.rounds):
                    ui.append(through_page(page, settings))
                    start = time.perf_counter()
                    status, body = client.post_prediction(api, settings)
                    direct.append(time.perf_counter() - start)
                    assert status == 200 and body["status"] == "succeeded", body
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=60)
    page_s, ui_s, api_s = (statistics.median(x) for x in (loads, ui, direct))
    print(f"settings: {settings}, {args.rounds} rounds, weights: {args.weights or 'tiny'}")
    print(f"page load to usable form: median {page_s:.2f} s ({', '.join(f'{x:.2f}' for x in loads)})")
    print(f"generation through the page: median {ui_s:.2f} s ({', '.join(f'{x:.2f}' for x in ui)})")
    print(f"same request straight to the API: median {api_s:.2f} s ({', '.join(f'{x:.2f}' for x in direct)})")
    print(f"page / API: {ui_s / api_s:.2f}x (+{ui_s - api_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
