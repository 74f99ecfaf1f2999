"""What a user reads when a Cog server says no: one line for a 422 and one for a failed prediction."""

from __future__ import annotations

import json
import re

# coglet 0.23 wraps the message of an exception raised by run() twice, and adds its class:
# "Prediction failed: Prediction failed: InputError: `prompt` contains ...". One "Prediction failed: "
# comes from coglet-python (predictor.rs: format!("Prediction failed: {}", err)), the other from
# coglet's PredictionError::Failed (#[error("Prediction failed: {0}")]), and "InputError: " from
# pyo3's Display of a Python exception ("{type qualname}: {str(exc)}"). None of it is ours. A failed
# training reads "Prediction failed: Training failed: ValueError: ..." the same way.
_COGLET_WRAPPING = re.compile(
    r"^(?:(?:Async prediction|Prediction|Async training|Training) failed: )+"
    r"(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit): )?"
)
SHOWN_CHARS = 80  # of an echoed value: the reason must not drown after 2,000 characters
# coglet's 422 quotes the whole value before the reason: `"猫猫…(2,345 characters)…" is longer than 2000 characters`
_LONG_QUOTED = re.compile(rf'"((?:[^"\\]|\\.){{{SHOWN_CHARS + 1},}})"', flags=re.DOTALL)


def clean_error(text: str) -> str:
    """The message a failed prediction's ``error`` carries, without coglet's wrapping (see above).

    ``clean_error("Prediction failed: Prediction failed: InputError: `mask` was given without `image`: ...")``
    is ``"`mask` was given without `image`: ..."``; a text without that wrapping comes back unchanged.
    """
    return _COGLET_WRAPPING.sub("", text, count=1)


# coglet 0.23's health after a failed setup() ends its setup logs with the exception, wrapped the same way plus the
# worker's slot id: "worker setup failed: worker setup failed (slot 3f…): Setup failed: setup failed: ScorerError: …"
_SETUP_WRAPPING = re.compile(
    r"^(?:(?:worker setup failed|[Ss]etup failed)(?: \(slot [\w-]+\))?: )+(?:[A-Za-z_][\w.]*(?:Error|Exception): )?"
)


def setup_error(state: dict) -> str:
    """The exception that failed ``setup()``, in one line without coglet's wrapping (see above), from a health
    state; the whole server log stays in the log file."""
    logs = (state.get("setup") or {}).get("logs") or ""
    lines = [line for line in logs.splitlines() if line.strip()]
    return _SETUP_WRAPPING.sub("", lines[-1], count=1) if lines else f"health {state}"


def validation_text(detail: list) -> str:
    """A 422's ``detail``, one ```input`: reason`` per entry (the input by the user's name, ``loc``'s last part)."""
    return "; ".join(f"`{(entry.get('loc') or ['?'])[-1]}`: {entry.get('msg')}" for entry in detail)


def error_text(status: int, body: dict) -> str:
    """What went wrong, in one line: a 422's inputs and reasons, a failed prediction's ``error``, else the body.

    A long value the server echoes is cut (:func:`shorten_echoes`).
    """
    if status == 422 and isinstance(body.get("detail"), list):
        text = validation_text(body["detail"])
    elif body.get("error"):
        text = clean_error(str(body["error"]))
    else:
        text = str(body.get("detail") or body)
    return shorten_echoes(text)


def shorten_echoes(text: str) -> str:
    """Each quoted value longer than :data:`SHOWN_CHARS`, cut to its start and length: ``"猫…" (2,345 characters)``."""

    def cut(match: re.Match) -> str:
        try:
            value = json.loads(match.group(0))  # the JSON string coglet wrote
        except json.JSONDecodeError:
            value = match.group(1)
        return f'"{value[:SHOWN_CHARS]}…" ({len(value):,} characters)'

    return _LONG_QUOTED.sub(cut, text)


def with_file_names(error: str, names: dict[str, str]) -> str:
    """``error`` with the user's file name after each input that names none: "`input_images` (data.zip) …"."""
    for key, name in names.items():
        error = re.sub(rf"`{re.escape(key)}`(?! \()", lambda _, key=key, name=name: f"`{key}` ({name})", error, count=1)
    return error
