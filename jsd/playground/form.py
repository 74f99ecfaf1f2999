"""The playground's form, read from a Cog server's ``/openapi.json``: one :class:`Field` per property of ``Input``.

Nothing here knows ``predict.py``: an input added to the predictor appears in the form with its description,
default, bounds and choices, because Cog's schema carries them (``scripts/cog_local.py`` writes it with Cog's own
inspection; ``cog build`` writes the same document into the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JS_SAFE_INTEGER = 2**53 - 1  # a browser's number loses integers above this (a 63-bit seed): such inputs stay text


class SchemaError(ValueError):
    """The document is not a Cog model's schema (no ``components.schemas.Input`` with properties)."""


@dataclass(frozen=True)
class Field:
    """One input of the model, as the schema describes it.

    ``kind`` is the widget family: ``text``, ``integer``, ``number``, ``boolean``, ``choice`` or ``file``
    (a ``format: uri`` input: uploads, sent as data URIs). ``big_integer`` marks an integer whose range a
    browser's number cannot hold exactly.
    """

    name: str
    kind: str
    description: str = ""
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    choices: tuple = ()
    required: bool = False
    nullable: bool = False

    @property
    def big_integer(self) -> bool:
        return self.kind == "integer" and (self.maximum is None or self.maximum > JS_SAFE_INTEGER)

    @property
    def bounds_text(self) -> str:
        """``1–100`` style range, or "" without bounds (shown next to the description)."""
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else _number(self.minimum)
        high = "" if self.maximum is None else _number(self.maximum)
        return f"{low}–{high}"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def input_fields(schema: dict) -> list[Field]:
    """The ``Input`` properties of a Cog OpenAPI document, in ``x-order``; raises :class:`SchemaError`."""
    if not isinstance(schema, dict):
        raise SchemaError("the document is not a JSON object")
    schemas = schema.get("components", {}).get("schemas", {}) if isinstance(schema.get("components"), dict) else {}
    inputs = schemas.get("Input") if isinstance(schemas, dict) else None
    if not isinstance(inputs, dict) or not isinstance(inputs.get("properties"), dict) or not inputs["properties"]:
        raise SchemaError("it has no components.schemas.Input with properties (is this a Cog model's /openapi.json?)")
    required = set(inputs.get("required", []))
    ordered = sorted(inputs["properties"].items(), key=lambda item: item[1].get("x-order", 1_000_000))
    return [_field(name, prop, schemas, name in required) for name, prop in ordered]


def _field(name: str, prop: dict, schemas: dict, required: bool) -> Field:
    resolved = prop
    choices: tuple = ()
    if "allOf" in prop:  # Cog puts choices in their own component (an enum), referenced from the property
        ref = prop["allOf"][0].get("$ref", "")
        resolved = schemas.get(ref.rsplit("/", 1)[-1], {})
        choices = tuple(resolved.get("enum", ()))
    kind = _kind(resolved, choices)
    return Field(
        name=name,
        kind=kind,
        description=prop.get("description", ""),
        default=prop.get("default"),
        minimum=prop.get("minimum"),
        maximum=prop.get("maximum"),
        max_length=prop.get("maxLength"),
        choices=choices,
        required=required,
        nullable=bool(prop.get("nullable")),
    )


def _kind(prop: dict, choices: tuple) -> str:
    if choices:
        return "choice"
    if prop.get("format") == "uri":
        return "file"
    return {"integer": "integer", "number": "number", "boolean": "boolean"}.get(prop.get("type"), "text")


def request_inputs(fields: list[Field], values: list[Any]) -> dict:
    """The ``input`` object of a prediction from the form's values (files are handled by the caller).

    An empty optional field is left out (the model's default applies); a big integer typed as text is
    converted here and a value that is not a whole number is sent as typed, so the server's validation
    names the input (one message format for every bad value).
    """
    inputs = {}
    for field, value in zip(fields, values, strict=True):
        if value is None or (isinstance(value, str) and value.strip() == "" and field.kind != "text"):
            continue
        if field.kind == "text" and value == "" and field.nullable:
            continue
        if field.kind == "integer":
            value = _integer(value)
        inputs[field.name] = value
    return inputs


def _integer(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


def settings_values(fields: list[Field], settings: dict) -> dict:
    """The form's values from saved settings (an output file's embedded text, a history entry), by input name.

    Each value is converted to its field's kind (the file's settings are all text); a setting the form has no
    field for, a file input, or a value that does not fit its field (a choice the server no longer offers) is
    left out, so the form keeps what it had.
    """
    values = {}
    for field in fields:
        raw = settings.get(field.name)
        if raw is None or field.kind == "file":
            continue
        value = _typed(field, raw)
        if value is not None:
            values[field.name] = value
    return values


def _typed(field: Field, raw: Any) -> Any:
    text = str(raw).strip()
    try:
        if field.kind == "choice":
            return next((choice for choice in field.choices if str(choice) == text), None)
        if field.kind == "boolean":
            return (
                text.lower() in ("true", "1", "yes")
                if text.lower() in ("true", "false", "1", "0", "yes", "no")
                else None
            )
        if field.kind == "integer":
            number = int(text) if text.lstrip("-").isdigit() else int(float(text))
            return str(number) if field.big_integer else number  # a seed lives in a text box
        if field.kind == "number":
            return float(text)
    except ValueError:
        return None
    return str(raw)
