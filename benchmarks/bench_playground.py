"""The playground's own cost: page load to a usable form, and a generation through the page against the same
request sent straight to Cog's API (one run, one server, the ratio printed).

    python benchmarks/bench_playground.py                    # tiny checkpoint, 3 rounds
    python benchmarks/bench_playground.py --weights weights/ --steps 25 --size 512
    python benchmarks/bench_playground.py --before main      # also main's playground, in the same run

It starts ``python -m jsd playground`` *without* ``--api`` (so the playground starts its own coglet on a
free loopback port, as a user's first run does) and drives it in headless Debian Chromium (``/usr/bin/chromium``,
``make playground-test`` installs it). Each round, alternating: one generation clicked in the page (button
press to the gallery's message, so it includes the async request, the webhook's events, decoding the data
URI, Gradio's file serving and the browser's rendering) and one synchronous ``POST /predictions`` with the
same input to the same server. It prints the medians and the ratio; speed is not a test (docs/playground.md).
``--before REF`` measures the playground of a git ref (``git archive`` into a temporary folder, imported from
there) first, then this checkout's, one after the other in the same run, and prints both.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
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


def start_playground(weights: Path, port: int, log_path: Path, repo: Path = REPO) -> tuple[subprocess.Popen, str]:
    """The playground of ``repo`` on ``port`` with its own coglet; returns the process and the coglet URL it printed."""
    log = open(log_path, "w")  # noqa: SIM115 (read while the process writes it)
    env = dict(os.environ, PYTHONPATH=str(repo))  # ``repo``'s jsd, not the installed checkout's
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "jsd", "playground", "--weights", str(weights), "--port", str(port)],
        cwd=repo,
        env=env,
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


def export(ref: str, folder: Path) -> Path:
    """The files of git ref ``ref`` in ``folder`` (``git archive``): the playground as it was."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def measure(browser, repo: Path, weights: Path, settings: dict, rounds: int, tmp: Path) -> dict[str, list[float]]:
    """Page loads, generations through the page and the same requests straight to the API, for ``repo``'s playground."""
    port = client.free_port()
    process, api = start_playground(weights, port, tmp / f"playground-{port}.log", repo)
    try:
        url = f"http://127.0.0.1:{port}"
        loads = [page_load(browser, url) for _ in range(rounds)]
        page = browser.new_page(locale="ja-JP")
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#generate:enabled")
        fill(page, settings)
        through_page(page, settings)  # warm-up: the first prediction pays for lazy imports
        client.post_prediction(api, settings)
        ui, direct = [], []
        for _ in range(rounds):
            ui.append(through_page(page, settings))
            start = time.perf_counter()
            status, body = client.post_prediction(api, settings)
            direct.append(time.perf_counter() - start)
            assert status == 200 and body["status"] == "succeeded", body
        page.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"load": loads, "page": ui, "api": direct}


def report(name: str, runs: dict[str, list[float]]) -> None:
    page_s, ui_s, api_s = (statistics.median(runs[key]) for key in ("load", "page", "api"))
    listed = {key: ", ".join(f"{x:.2f}" for x in values) for key, values in runs.items()}
    print(f"[{name}] page load to usable form: median {page_s:.2f} s ({listed['load']})")
    print(f"[{name}] generation through the page: median {ui_s:.2f} s ({listed['page']})")
    print(f"[{name}] same request straight to the API: median {api_s:.2f} s ({listed['api']})")
    print(f"[{name}] page / API: {ui_s / api_s:.2f}x (+{ui_s - api_s:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a checkpoint folder (default: a tiny one, made here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--before", metavar="REF", help="also measure this git ref's playground first (e.g. main)")
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
        variants = {"this checkout": REPO}
        if args.before:
            variants = {args.before: export(args.before, Path(tmp) / "before")} | variants
        results = {}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS
            )
            for name, repo in variants.items():
                results[name] = measure(browser, repo, weights, settings, args.rounds, Path(tmp))
            browser.close()
    print(f"settings: {settings}, {args.rounds} rounds, weights: {args.weights or 'tiny'}")
    for name, runs in results.items():
        report(name, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
