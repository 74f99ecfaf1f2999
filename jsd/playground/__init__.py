"""A browser playground for the model: its own form over Cog's HTTP API (``python -m jsd playground``).

:mod:`jsd.playground.form` reads the form from ``/openapi.json``, :mod:`jsd.playground.cog_api` speaks Cog's
protocol (async predictions with a webhook, cancel, 409 retries), :mod:`jsd.playground.app` is the Gradio page.
Gradio and Playwright come with the ``playground`` extra (``make venv`` installs it); the Cog image has neither.
"""

# Headless Debian Chromium as the browser tests and the benchmark start it (design.md): without the networking
# flags its own connections are refused in bursts on a machine with no network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
