"""A browser playground for the model: its own form over Cog's HTTP API (``python -m jsd playground``).

:mod:`jsd.playground.form` reads the form from ``/openapi.json``, :mod:`jsd.playground.cog_api` keeps a page's
predictions (async with a webhook, cancel) over :mod:`jsd.coghttp`, :mod:`jsd.playground.app` is the Gradio page.
Gradio and Playwright come with the ``playground`` extra (``make venv`` installs it); the Cog image has neither.
"""
