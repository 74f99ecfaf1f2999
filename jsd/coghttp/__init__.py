"""Cog's HTTP protocol, spoken once: every client of a Cog server in this project imports it from here.

- :mod:`jsd.coghttp.client`: health, schema, predictions (sync, or async with a webhook), trainings, cancel,
  all through one POST that retries a 409 with back-off;
- :mod:`jsd.coghttp.errors`: the one line a user reads for a 422 or a failed prediction;
- :mod:`jsd.coghttp.datauri`: files in and out as data URIs;
- :mod:`jsd.coghttp.webhook`: the receiver coglet posts an async prediction's events to;
- :mod:`jsd.coghttp.local`: the local coglet process (its schema from Cog's inspection, start, setup, stop);
- :mod:`jsd.coghttp.fake`: a scripted fake Cog server for tests.

Standard library only, except :mod:`jsd.coghttp.local`'s schema, which Cog itself inspects.
"""
