"""The Gradio app: the model's own form (from ``/openapi.json``) over Cog's HTTP API.

    python -m jsd playground                         # starts coglet on weights/ (toy or tiny if none), opens :7860
    python -m jsd playground --api http://127.0.0.1:5000   # any running Cog server of this model

Nothing leaves the machine: Gradio's analytics are off, there is no share link, and the theme names the
system's fonts (a ``GoogleFont`` in a theme is fetched from a font CDN; Japanese needs the system's CJK fonts
anyway). tests/playground/ checks that a page asks nothing of any host but 127.0.0.1.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

from jsd.coghttp import client, datauri, local
from jsd.coghttp.datauri import encode_bytes as _data_uri
from jsd.playground import i18n
from jsd.playground.cog_api import (
    CogAPI,
    Outcome,
    PlaygroundError,
    ServerGone,
    WebhookReceiver,
    is_loopback,
    step_of,
)
from jsd.playground.form import Field, input_fields, request_inputs, settings_values

# Before gradio is imported: it reads these at import time. Its upload folder (gradio.route_utils.DEFAULT_TEMP_DIR)
# is fixed then too: without GRADIO_TEMP_DIR every upload stayed in /tmp/gradio after the playground stopped.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
TEMP_ROOT = Path(tempfile.mkdtemp(prefix="jsd-playground-"))  # Gradio's cache and our outputs; removed at exit
atexit.register(shutil.rmtree, TEMP_ROOT, ignore_errors=True)
os.environ.setdefault("GRADIO_TEMP_DIR", str(TEMP_ROOT / "gradio"))

import gradio as gr  # noqa: E402 (after the environment it reads at import)

SETUP_LOG_LINES = 15  # lines of a failed setup's log shown on the page
PAINTED = "painted"  # the image field is an editor: its brush layer becomes the mask
MAIN_FIELDS = ("prompt", "negative_prompt", "seed")  # beside the results; the rest below, under 詳細設定
HISTORY_SIZE = 30  # runs kept in the browser (localStorage): a 96 px thumbnail and the settings each
THUMBNAIL_PX = 96
HISTORY_KEY = "jsd-playground-history"
# Ctrl+Enter (⌘+Enter) anywhere on the page presses Generate, the A1111 habit. Gradio runs this on load.
# A file that is not an image, dropped or chosen for the image editor, is refused with a message: Gradio's
# editor ignored it silently and a plain txt2img ran.
PAGE_JS = """() => {
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      document.querySelector("#generate")?.click();
    }
  });
  const words = %(words)s;
  const say = (name) => {
    const lang = (navigator.language || "en").toLowerCase().startsWith("ja") ? "ja" : "en";
    let box = document.querySelector("#drop-message");
    if (!box) {
      box = document.createElement("div");
      box.id = "drop-message";
      box.setAttribute("role", "alert");
      box.style.cssText = "color: var(--error-text-color, #b91c1c); font-weight: 600; margin: 4px 0;";
      document.querySelector("#input-image")?.before(box);
    }
    box.textContent = words[lang].replace("{file}", name);
  };
  const refuse = (event, files) => {
    const bad = [...(files || [])].find((file) => !file.type.startsWith("image/"));
    if (!bad) return false;
    event.preventDefault();
    event.stopImmediatePropagation();
    say(bad.name);
    return true;
  };
  document.addEventListener("drop", (event) => {
    if (event.target.closest?.("#input-image")) refuse(event, event.dataTransfer?.files);
  }, true);
  document.addEventListener("change", (event) => {
    const input = event.target;
    if (input.matches?.("#input-image input[type=file]") && refuse(event, input.files)) input.value = "";
  }, true);
  document.addEventListener("click", (event) => {
    if (event.target.closest?.("#generate")) document.querySelector("#drop-message")?.remove();
  }, true);
  // Gradio's English outside its translation tables (tooltips, aria-labels), in Japanese for a Japanese browser.
  if (!(navigator.language || "").toLowerCase().startsWith("ja")) return;
  const fixed = %(fixed)s;
  const patterns = %(patterns)s.map(([source, target]) => [new RegExp(source), target]);
  const japanese = (text) => {
    const key = text.trim();
    if (fixed[key]) return text.replace(key, fixed[key]);
    for (const [pattern, target] of patterns) if (pattern.test(key)) return key.replace(pattern, target);
    return text;
  };
  const translate = (root) => {
    const labelled = "[title], [aria-label], [placeholder], [alt]";
    const elements = root.querySelectorAll ? [root, ...root.querySelectorAll(labelled)] : [];
    for (const el of elements) {
      for (const attr of ["title", "aria-label", "placeholder", "alt"]) {
        const value = el.getAttribute?.(attr);
        if (value && japanese(value) !== value) el.setAttribute(attr, japanese(value));
      }
    }
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement?.closest("textarea, input, #message, #history, #token-report")) continue;
      const text = japanese(node.textContent);
      if (text !== node.textContent) node.textContent = text;
    }
  };
  translate(document.body);
  new MutationObserver((records) => {
    for (const record of records) {
      const target = record.type === "characterData" ? record.target.parentElement : record.target;
      if (target) translate(target);
    }
  }).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true,
    attributeFilter: ["title", "aria-label", "placeholder", "alt"] });
}"""


def _lang(request: gr.Request | None) -> str:
    headers = getattr(request, "headers", None) or {}
    return i18n.language(headers.get("accept-language"))


def server_state(api: CogAPI, lang: str) -> tuple[bool, str]:
    """(ready to take a prediction, what to say about the server) from ``GET /health-check``."""
    health = api.health()
    status = health.get("status")
    if status == "UNREACHABLE":
        return False, i18n.message(lang, "down", url=api.url)
    if status == "SETUP_FAILED":
        logs = (health.get("setup") or {}).get("logs") or ""
        tail = "\n".join(logs.rstrip().splitlines()[-SETUP_LOG_LINES:])
        return False, f"{i18n.message(lang, 'setup_failed', url=api.url)}\n\n```\n{tail}\n```"
    if status in ("READY", "BUSY"):  # BUSY: the request waits its turn (409s are retried)
        return True, i18n.message(lang, "ready" if status == "READY" else "busy", url=api.url)
    return False, i18n.message(lang, "starting", url=api.url, status=status)


def token_report(metrics: dict, lang: str) -> str:
    """The prompt's token report from the prediction's metrics (``jsd.prompting.TokenReport.metrics``)."""
    if "prompt_tokens" not in metrics:
        return ""
    lines = [i18n.message(lang, "tokens", pieces=metrics["prompt_tokens"], chunks=metrics.get("prompt_chunks", "?"))]
    count = metrics.get("prompt_truncated_tokens", 0)
    if count and metrics.get("prompt_truncated_text"):
        lines.append(i18n.message(lang, "truncated", text=metrics["prompt_truncated_text"], count=count))
    elif count:
        lines.append(i18n.message(lang, "truncated_count", count=count))
    else:
        lines.append(i18n.message(lang, "not_truncated"))
    return " ".join(lines)


def _file_input(field: Field, path: str, lang: str) -> str:
    """An uploaded file as a data URI, its bytes unchanged; a file that is not an image is one clear line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mime = Image.MIME.get(image.format or "", "application/octet-stream")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise PlaygroundError(i18n.message(lang, "not_image", name=field.name, file=Path(path).name)) from None
    return _data_uri(Path(path).read_bytes(), mime)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def painted_mask(layers: list) -> bytes | None:
    """White where any brush layer has paint, black elsewhere, as PNG; None when nothing is painted."""
    from PIL import Image, ImageChops

    painted = [layer.convert("RGBA").getchannel("A") for layer in layers if layer is not None]
    if not painted:
        return None
    mask = painted[0]
    for alpha in painted[1:]:
        mask = ImageChops.lighter(mask, alpha.resize(mask.size))
    mask = mask.point(lambda value: 255 if value > 0 else 0)
    if mask.getbbox() is None:
        return None
    return _png(Image.merge("L", [mask]))


def check_lengths(fields: list[Field], inputs: dict, lang: str) -> None:
    """A text longer than the schema's ``maxLength``: one short line naming the input (the server's 422 quotes the
    whole 2,500 characters before its reason)."""
    for field in fields:
        value = inputs.get(field.name)
        if field.max_length and isinstance(value, str) and len(value) > field.max_length:
            start = value[:20]
            text = i18n.message(
                lang, "too_long", name=field.name, count=len(value), limit=field.max_length, start=start
            )
            raise PlaygroundError(text)


def prepare_inputs(fields: list[Field], widgets: dict[str, str], values: list, lang: str) -> dict:
    """The prediction's ``input`` from the form: files become data URIs, the painted layer the mask."""
    plain, files = [], {}
    for field, value in zip(fields, values, strict=True):
        if field.kind == "file":
            files[field.name] = value
            plain.append(None)
        else:
            plain.append(value)
    inputs = request_inputs(fields, plain)
    by_name = {field.name: field for field in fields}
    for name, value in files.items():
        if widgets.get(name) == PAINTED:
            background = (value or {}).get("background")
            if background is not None:
                inputs[name] = _data_uri(_png(background.convert("RGB")), "image/png")
                mask = painted_mask((value or {}).get("layers") or [])
                if mask is not None and not files.get("mask"):
                    inputs["mask"] = _data_uri(mask, "image/png")
        elif value:
            inputs[name] = _file_input(by_name[name], value, lang)
    check_lengths(fields, inputs, lang)
    return inputs


def save_outputs(outcome: Outcome, folder: Path) -> list[tuple[str, int | None]]:
    """The output files, decoded from their data URIs byte for byte, each with its seed."""
    paths = datauri.write_prediction_output(outcome.body.get("output") or [], folder)
    seeds = list(outcome.body.get("metrics", {}).get("seeds") or [])
    if len(seeds) != len(paths):  # a flagged image is not returned: read each file's own seed
        seeds = [_embedded_seed(path) for path in paths]
    return [(str(path), seed) for path, seed in zip(paths, seeds, strict=True)]


def thumbnail_uri(path: str) -> str:
    """A small JPEG of an output as a data URI: what the history keeps in the browser."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def history_entry(inputs: dict, images: list[tuple[str, int | None]]) -> dict:
    """One run for the history: its settings (no uploaded files), its first seed and a thumbnail."""
    settings = {k: v for k, v in inputs.items() if not (isinstance(v, str) and v.startswith("data:"))}
    seed = images[0][1] if images else None
    return {"settings": settings | {"seed": seed}, "thumbnail": thumbnail_uri(images[0][0]) if images else ""}


def _embedded_seed(path: Path) -> int | None:
    from jsd.serving import read_metadata

    with contextlib.suppress(Exception):
        return int(read_metadata(path)["seed"])
    return None


class Playground:
    """The page and its handlers, for one Cog server and the fields of its schema."""

    def __init__(self, api: CogAPI, fields: list[Field], output_dir: Path) -> None:
        self.api = api
        self.fields = fields
        self.output_dir = output_dir
        names = {field.name for field in fields}
        # The image field doubles as the mask painter when the model takes both.
        self.widgets = {"image": PAINTED} if {"image", "mask"} <= names else {}

    # ---- the page --------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """Prompt and results side by side on a wide screen, one under the other on a phone (Gradio's columns
        wrap below their min_width); the other inputs and the history below."""
        with gr.Blocks(title="jsd playground", analytics_enabled=False) as demo:
            self.title = gr.Markdown(elem_id="title")
            self.server = gr.Markdown(elem_id="server-status")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=360):
                    main = self._widgets([f for f in self.fields if f.name in MAIN_FIELDS])
                    with gr.Row():
                        self.generate_button = gr.Button(i18n_label("generate"), variant="primary", elem_id="generate")
                        self.cancel_button = gr.Button(i18n_label("cancel"), variant="stop", elem_id="cancel")
                with gr.Column(scale=1, min_width=360):
                    self.message = gr.Markdown(elem_id="message")
                    self.gallery = gr.Gallery(
                        label=i18n_label("gallery"), elem_id="gallery", columns=2, height="auto", format="png"
                    )
                    self.reuse = gr.Button(i18n_label("reuse_seed"), elem_id="reuse-seed", size="sm")
                    self.tokens = gr.Markdown(elem_id="token-report")
                    self.downloads = gr.File(label=i18n_label("downloads"), file_count="multiple", elem_id="downloads")
            with gr.Accordion(i18n_label("advanced"), open=True):
                rest = self._widgets([f for f in self.fields if f.name not in MAIN_FIELDS])
                self.settings_file = gr.File(
                    label=i18n_label("settings_file"),
                    file_types=[".png", ".webp", ".jpg", ".jpeg"],
                    type="filepath",
                    elem_id="settings-file",
                    height=120,
                )
            self.history_gallery = gr.Gallery(
                label=i18n_label("history"), elem_id="history", columns=8, height="auto", allow_preview=False
            )
            self.history = gr.BrowserState([], storage_key=HISTORY_KEY)
            self.seeds = gr.State([])
            self.selected = gr.State(0)
            self.history_outputs = [self.history, self.history_gallery]
            built = main | rest
            self.components = [built[field.name] for field in self.fields]
            self.components_by_name = {field.name: built[field.name] for field in self.fields}
            self._wire(demo)
        return demo

    def _widgets(self, fields: list[Field]) -> dict:
        built = {}
        for field in fields:
            special = self.widgets.get(field.name)
            if special == PAINTED:  # the editor has no description of its own: say what painting does
                gr.Markdown(i18n_label("paint_hint"), elem_id="paint-hint")
            built[field.name] = widget(field, special)
        return built

    def _wire(self, demo: gr.Blocks) -> None:
        demo.load(self.on_load, [self.history], [self.title, self.server, self.history_gallery], queue=False)
        self.generate_button.click(
            self.generate,
            set(self.components) | {self.history},
            [
                self.gallery,
                self.message,
                self.tokens,
                self.downloads,
                self.seeds,
                self.server,
                self.selected,
                *self.history_outputs,
            ],
            show_progress="full",
            show_progress_on=[self.gallery],
            # No Gradio queue: a request waits for the server's slot in CogAPI.submit_when_free, where Cancel
            # reaches it (in Gradio's queue it could not be canceled, and a frozen run blocked every tab).
            concurrency_limit=None,
        )
        self.cancel_button.click(self.cancel, None, None, queue=False)
        self.gallery.select(_selected_index, None, self.selected)
        seed_box = self.components_by_name.get("seed")
        if seed_box is not None:
            self.reuse.click(self.reuse_seed, [self.seeds, self.selected], [seed_box, self.message])
        else:
            self.reuse.visible = False
        self.settings_file.upload(self.load_settings, [self.settings_file], [*self.components, self.message])
        self.history_gallery.select(self.load_history, [self.history], [*self.components, self.message])

    # ---- handlers ----------------------------------------------------------------------------------
    def on_load(self, history: list, request: gr.Request):
        lang = _lang(request)
        _, state = server_state(self.api, lang)
        title = f"## {i18n.message(lang, 'title')}\n{i18n.message(lang, 'intro', url=self.api.url)}"
        return title, state, self.history_items(history)

    def generate(self, form: dict, request: gr.Request, progress=gr.Progress()) -> Iterator[dict]:  # noqa: B008
        """One prediction: the form's values in, the gallery, a message, the token report and the files out."""
        lang = _lang(request)
        values = [form[component] for component in self.components]
        # An error replaces the previous results: they must not read as this request's answer.
        cleared = {self.gallery: [], self.tokens: "", self.downloads: None, self.seeds: [], self.selected: 0}
        ready, state = server_state(self.api, lang)
        if not ready:
            yield cleared | {self.message: state, self.server: state}
            return
        try:
            inputs = prepare_inputs(self.fields, self.widgets, list(values), lang)
        except PlaygroundError as err:
            yield cleared | {self.message: str(err)}
            return
        start = time.monotonic()
        total = inputs.get("num_inference_steps") or _default(self.fields, "num_inference_steps")
        progress(0, desc=i18n.message(lang, "running"))

        def on_event(body: dict) -> None:
            step = step_of(body.get("logs") or "")
            if step is not None:
                progress(step, desc=i18n.message(lang, "running"), unit=i18n.message(lang, "steps"))
            elif total:
                progress((0, total), desc=i18n.message(lang, "running"), unit=i18n.message(lang, "steps"))

        def on_wait() -> None:
            progress(0, desc=i18n.message(lang, "waiting"))

        session = request.session_hash or ""
        try:
            outcome = self.api.predict(inputs, session=session, on_event=on_event, on_wait=on_wait)
        except ServerGone:
            _, state = server_state(self.api, lang)
            yield cleared | {self.message: i18n.message(lang, "lost", url=self.api.url), self.server: state}
            return
        except (PlaygroundError, urllib.error.URLError, ConnectionError, TimeoutError):
            _, state = server_state(self.api, lang)
            yield cleared | {self.message: state, self.server: state}
            return
        result = self._result(outcome, inputs, form[self.history], lang, time.monotonic() - start)
        yield result if outcome.succeeded else cleared | result

    def _result(self, outcome: Outcome, inputs: dict, history: list, lang: str, seconds: float) -> dict:
        if outcome.canceled:
            return {self.message: i18n.message(lang, "canceled")}
        if not outcome.succeeded:
            key = {422: "invalid", 200: "failed"}.get(outcome.http_status, "http")
            error = i18n.server_error(lang, outcome.error_text())
            return {self.message: i18n.message(lang, key, error=error, status=outcome.http_status)}
        folder = Path(tempfile.mkdtemp(prefix="prediction-", dir=self.output_dir))
        images = save_outputs(outcome, folder)
        seeds = [seed for _, seed in images]
        gallery = [(path, i18n.message(lang, "seed_caption", seed=seed)) for path, seed in images]
        report = token_report(outcome.body.get("metrics") or {}, lang)
        # The prediction's id finds it in the server's log, and tells two runs with the same timing apart.
        prediction = outcome.body.get("id") or "?"
        done = i18n.message(lang, "done", count=len(images), seconds=seconds, prediction=prediction)
        done += " " + i18n.message(lang, "done_seeds", seeds=", ".join(str(seed) for seed in seeds))
        history = [history_entry(inputs, images), *(history or [])][:HISTORY_SIZE] if images else history
        return {
            self.gallery: gallery,
            self.message: done,
            self.tokens: report,
            self.downloads: [path for path, _ in images],
            self.seeds: seeds,
            self.selected: 0,
            self.history: history,
            self.history_gallery: self.history_items(history),
        }

    def cancel(self, request: gr.Request) -> None:
        self.api.cancel(request.session_hash or "")

    def reuse_seed(self, seeds: list, selected: int, request: gr.Request):
        lang = _lang(request)
        if not seeds:
            return gr.skip(), i18n.message(lang, "no_seed")
        seed = seeds[selected] if 0 <= selected < len(seeds) else seeds[0]
        return str(seed), i18n.message(lang, "seed_set", seed=seed)

    def load_settings(self, path: str | None, request: gr.Request) -> list:
        """The form takes the settings an output file carries (``jsd.serving.read_metadata``)."""
        from jsd.serving import read_metadata

        lang = _lang(request)
        if not path:
            return [gr.skip()] * (len(self.components) + 1)
        name = Path(path).name
        try:
            settings = read_metadata(path)
        except Exception:  # not an image, or a broken one: it has no settings either
            settings = {}
        values = settings_values(self.fields, settings)
        if not values:
            return [gr.skip()] * len(self.components) + [i18n.message(lang, "no_settings", file=name)]
        names = ", ".join(values)
        return [*self._form_update(values), i18n.message(lang, "settings_loaded", file=name, names=names)]

    def load_history(self, history: list, evt: gr.SelectData, request: gr.Request) -> list:
        index = evt.index if isinstance(evt.index, int) else 0
        if not history or not 0 <= index < len(history):
            return [gr.skip()] * (len(self.components) + 1)
        settings = history[index].get("settings") or {}
        values = settings_values(self.fields, settings)
        loaded = i18n.message(_lang(request), "history_loaded", seed=settings.get("seed", "?"))
        return [*self._form_update(values), loaded]

    def _form_update(self, values: dict) -> list:
        return [values.get(field.name, gr.skip()) for field in self.fields]

    def history_items(self, history: list) -> list[tuple[str, str]]:
        """The history's thumbnails as files (Gradio's gallery serves files), captioned with seed and prompt."""
        folder = self.output_dir / "history"
        folder.mkdir(exist_ok=True)
        items = []
        for entry in history or []:
            uri = entry.get("thumbnail") or ""
            if not uri.startswith("data:"):
                continue
            data = base64.b64decode(uri.partition(",")[2])
            path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.jpg"
            if not path.exists():
                path.write_bytes(data)
            settings = entry.get("settings") or {}
            items.append((str(path), f"{settings.get('seed', '?')}: {str(settings.get('prompt', ''))[:24]}"))
        return items


def page_js() -> str:
    """The page's script with its words filled in (JSON: the script reads them as literals)."""
    return PAGE_JS % {
        "words": json.dumps(drop_words(), ensure_ascii=False),
        "fixed": json.dumps(i18n.GRADIO_FIXED_JA, ensure_ascii=False),
        "patterns": json.dumps(i18n.GRADIO_PATTERNS_JA, ensure_ascii=False),
    }


def drop_words() -> dict[str, str]:
    """The refusal of a non-image file in the image editor, for the page's script (``{file}`` filled there)."""
    return {lang: i18n.message(lang, "drop_not_image", file="{file}") for lang in i18n.MESSAGES}


def _selected_index(evt: gr.SelectData) -> int:
    return evt.index if isinstance(evt.index, int) else 0


def _default(fields: list[Field], name: str):
    return next((field.default for field in fields if field.name == name), None)


def i18n_label(key: str):
    """A word the browser translates (``gr.I18n``): Japanese or English by its language."""
    return I18N(key)


I18N = gr.I18n(**i18n.gradio_translations())


def I18N_INFO(key: str, *, english: str, japanese: str):
    """A translated text made at build time (a description from the schema): added to the tables, then keyed."""
    I18N.translations.setdefault("en", {})[key] = english
    I18N.translations.setdefault("ja", {})[key] = japanese
    return I18N(key)


def widget(field: Field, special: str | None = None):
    """The Gradio component for one schema field: its label, description with bounds, default and choices."""
    label = I18N(f"field.{field.name}") if field.name in i18n.FIELD_LABELS["ja"] else field.name
    info = _info(field)
    common = {"label": label, "info": info, "elem_id": f"input-{field.name}"}
    if special == PAINTED:
        brush = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24)
        return gr.ImageEditor(
            label=label, elem_id=common["elem_id"], type="pil", sources=["upload"], brush=brush, transforms=()
        )
    if field.kind == "file":
        return gr.File(label=label, elem_id=common["elem_id"], type="filepath", file_count="single")
    if field.kind == "boolean":
        return gr.Checkbox(value=bool(field.default), **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=field.default, **common)
    if field.kind in ("integer", "number") and not field.big_integer and None not in (field.minimum, field.maximum):
        step = 1 if field.kind == "integer" else _step(field.maximum - field.minimum)
        value = field.default if field.default is not None else field.minimum
        return gr.Slider(minimum=field.minimum, maximum=field.maximum, step=step, value=value, **common)
    if field.kind in ("integer", "number"):  # unbounded, or an integer a browser's number cannot hold (a seed)
        value = "" if field.default is None else str(field.default)
        return gr.Textbox(value=value, lines=1, **common)
    lines = 3 if (field.max_length or 0) > 200 and field.name.endswith("prompt") else 1
    return gr.Textbox(value=field.default or "", lines=lines, max_lines=8, **common)


def _info(field: Field):
    """The description (Japanese for a Japanese browser where translated, the schema's English otherwise) and range."""
    english = " ".join(part for part in (field.description, _range(field)) if part)
    if field.name not in i18n.FIELD_DESCRIPTIONS:
        return english
    japanese = " ".join(part for part in (i18n.FIELD_DESCRIPTIONS[field.name], _range(field)) if part)
    return I18N_INFO(f"info.{field.name}", english=english, japanese=japanese)


def _range(field: Field) -> str:
    return f"({field.bounds_text})" if field.bounds_text and field.kind in ("integer", "number") else ""


def _step(span: float) -> float:
    return 0.01 if span <= 2 else 0.1


# ---- running it -------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_server(weights: str, setup_timeout: float) -> Iterator[str]:
    """coglet on a free loopback port with ``weights`` (toy or tiny when there are none, as ``make demo``)."""
    from jsd.tiny import ensure_weights
    from jsd.toyworld import TOY_NOTE, TOY_PROMPT

    if not (local.ROOT / local.PREDICTOR_REF.split(":")[0]).is_file():
        raise PlaygroundError(f"no predict.py in {local.ROOT}: start it in the model's folder, or give --api")
    folder = Path(weights).resolve()
    try:
        kind = ensure_weights(folder)
    except FileExistsError as err:
        raise PlaygroundError(str(err)) from None
    log_path = local.ROOT / ".cog" / "coglet-playground.log"
    log_path.parent.mkdir(exist_ok=True)
    print(f"Starting coglet with {kind} weights {folder} (server log: {log_path})", file=sys.stderr)
    if kind == "tiny":
        print("(tiny random weights: the images are noise; put real weights in weights/)", file=sys.stderr)
    if kind == "toy":
        print(f"(toy weights: {TOY_NOTE}; ask for 128x128 shapes such as {TOY_PROMPT})", file=sys.stderr)
    with open(log_path, "wb") as log, local.running_server(folder, workdir=local.ROOT, log=log) as (url, process):
        state = client.wait_for_setup(url, process, setup_timeout)
        print(f"coglet at {url}: {state['status']}", file=sys.stderr)
        yield url


def _stop_on_sigterm() -> None:
    """SIGTERM ends like Ctrl+C: the ``with`` blocks stop the local server and remove the temporary files."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


def serve(*, api_url: str | None, weights: str, port: int, setup_timeout: float = 600) -> None:
    """Run the playground on 127.0.0.1:``port`` until interrupted. Raises :class:`PlaygroundError` (one line)."""
    with contextlib.ExitStack() as stack:
        url = api_url.rstrip("/") if api_url else stack.enter_context(local_server(weights, setup_timeout))
        webhook = stack.enter_context(contextlib.closing(WebhookReceiver())) if is_loopback(url) else None
        api = CogAPI(url, webhook=webhook)
        fields = input_fields(api.schema_when_ready(setup_timeout, log=lambda line: print(line, file=sys.stderr)))
        outputs = TEMP_ROOT / "outputs"
        outputs.mkdir(exist_ok=True)
        demo = Playground(api, fields, outputs).build()
        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        _stop_on_sigterm()
        # On Ctrl+C: runs still waiting for the server end (and are canceled there) instead of holding the exit.
        stack.callback(api.close)
        print(f"Playground on http://127.0.0.1:{port} (server {url}; Ctrl+C stops it)", file=sys.stderr, flush=True)
        try:
            demo.queue(default_concurrency_limit=1).launch(
                server_name="127.0.0.1",
                server_port=port,
                share=False,
                inbrowser=False,
                quiet=True,
                i18n=I18N,
                theme=theme,
                js=page_js(),
                allowed_paths=[str(outputs)],
                footer_links=[],
            )
        finally:
            api.close()
            demo.close()  # stops Gradio's server thread, or the interpreter waits for it at exit
