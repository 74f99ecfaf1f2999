"""Headless Debian Chromium as the browser tests and ``bench_playground.py`` start it (one list, two users).

Without the networking flags its own connections are refused in bursts on a machine with no network.
"""

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
