"""The Gradio app: the model's own form (from ``/openapi.json``) over Cog's HTTP API.

    python -m jsd playground                         # starts coglet on weights/ (tiny if none), opens :7860
    python -m jsd playground --api http://127.0.0.1:5000   # any running Cog server of this model

Nothing leaves the machine: Gradio's analytics are off, there is no share link, and the theme names the
system's fonts (a ``GoogleFont`` in a theme is fetched from a font CDN; Japanese needs the system's CJK fonts
anyway). tests/playground/ checks that a page asks nothing of any host but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import os
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
from jsd.playground.cog_api import CogAPI, Outcome, PlaygroundError, WebhookReceiver, is_loopback, step_of
from jsd.playground.form import Field, input_fields, request_inputs

# Before gradio is imported: it reads these at import time.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr

SETUP_LOG_LINES = 15  # lines of a failed setup's log shown on the page
PAINTED = "painted"  # the image field is an editor: its brush layer becomes the mask
# Ctrl+Enter (⌘+Enter) anywhere on the page presses Generate, the A1111 habit. Gradio runs this on load.
CTRL_ENTER_JS = """() => {
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      document.querySelector("#generate")?.click();
    }
  });
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
    return inputs


def save_outputs(outcome: Outcome, folder: Path) -> list[tuple[str, int | None]]:
    """The output files, decoded from their data URIs byte for byte, each with its seed."""
    paths = datauri.write_prediction_output(outcome.body.get("output") or [], folder)
    seeds = list(outcome.body.get("metrics", {}).get("seeds") or [])
    if len(seeds) != len(paths):  # a flagged image is not returned: read each file's own seed
        seeds = [_embedded_seed(path) for path in paths]
    return [(str(path), seed) for path, seed in zip(paths, seeds, strict=True)]


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
        with gr.Blocks(title="jsd playground", analytics_enabled=False) as demo:
            title = gr.Markdown(elem_id="title")
            server = gr.Markdown(elem_id="server-status")
            with gr.Row():
                with gr.Column(scale=1):
                    components = self._form()
                with gr.Column(scale=1):
                    gallery = gr.Gallery(
                        label=i18n_label("gallery"), elem_id="gallery", columns=2, height="auto", format="png"
                    )
                    reuse = gr.Button(i18n_label("reuse_seed"), elem_id="reuse-seed", size="sm")
                    message = gr.Markdown(elem_id="message")
                    tokens = gr.Markdown(elem_id="token-report")
                    downloads = gr.File(label=i18n_label("downloads"), file_count="multiple", elem_id="downloads")
            seeds = gr.State([])
            selected = gr.State(0)
            demo.load(self.on_load, None, [title, server], queue=False, show_progress="hidden")
            self.generate_button.click(
                self.generate,
                set(components),
                [gallery, message, tokens, downloads, seeds, server],
                show_progress="full",
                show_progress_on=[gallery],
            )
            self.cancel_button.click(self.cancel, None, None, queue=False)
            gallery.select(_selected_index, None, selected)
            seed_box = self.components_by_name.get("seed")
            if seed_box is not None:
                reuse.click(self.reuse_seed, [seeds, selected], [seed_box, message])
            else:
                reuse.visible = False
        return demo

    def _form(self) -> list:
        components, self.components_by_name = [], {}
        main = [field for field in self.fields if field.name in ("prompt", "negative_prompt")]
        rest = [field for field in self.fields if field not in main]
        built = {}
        for field in main:
            built[field.name] = widget(field, self.widgets.get(field.name))
        with gr.Row():
            self.generate_button = gr.Button(i18n_label("generate"), variant="primary", elem_id="generate")
            self.cancel_button = gr.Button(i18n_label("cancel"), variant="stop", elem_id="cancel")
        with gr.Accordion(i18n_label("advanced"), open=True):
            for field in rest:
                built[field.name] = widget(field, self.widgets.get(field.name))
        for field in self.fields:
            components.append(built[field.name])
            self.components_by_name[field.name] = built[field.name]
        self.components = components
        return components

    # ---- handlers ----------------------------------------------------------------------------------
    def on_load(self, request: gr.Request):
        lang = _lang(request)
        _, state = server_state(self.api, lang)
        return f"## {i18n.message(lang, 'title')}\n{i18n.message(lang, 'intro', url=self.api.url)}", state

    def generate(self, form: dict, request: gr.Request, progress=gr.Progress()) -> Iterator[tuple]:  # noqa: B008
        """One prediction: the form's values in, the gallery, a message, the token report and the files out."""
        lang = _lang(request)
        values = [form[component] for component in self.components]
        keep = gr.skip()
        ready, state = server_state(self.api, lang)
        if not ready:
            yield [], state, "", None, [], state
            return
        try:
            inputs = prepare_inputs(self.fields, self.widgets, list(values), lang)
        except PlaygroundError as err:
            yield keep, str(err), "", keep, keep, keep
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

        try:
            outcome = self.api.predict(inputs, session=request.session_hash or "", on_event=on_event)
        except (PlaygroundError, urllib.error.URLError, ConnectionError, TimeoutError):
            _, state = server_state(self.api, lang)
            yield [], state, "", None, [], state
            return
        yield self._result(outcome, lang, time.monotonic() - start)

    def _result(self, outcome: Outcome, lang: str, seconds: float) -> tuple:
        keep = gr.skip()
        if outcome.canceled:
            return [], i18n.message(lang, "canceled"), "", None, [], keep
        if not outcome.succeeded:
            key = {422: "invalid", 200: "failed"}.get(outcome.http_status, "http")
            text = i18n.message(lang, key, error=outcome.error_text(), status=outcome.http_status)
            return keep, text, "", keep, keep, keep
        folder = Path(tempfile.mkdtemp(prefix="prediction-", dir=self.output_dir))
        images = save_outputs(outcome, folder)
        gallery = [(path, i18n.message(lang, "seed_caption", seed=seed)) for path, seed in images]
        report = token_report(outcome.body.get("metrics") or {}, lang)
        # The prediction's id finds it in the server's log, and tells two runs with the same timing apart.
        prediction = outcome.body.get("id") or "?"
        done = i18n.message(lang, "done", count=len(images), seconds=seconds, prediction=prediction)
        return gallery, done, report, [path for path, _ in images], [seed for _, seed in images], keep

    def cancel(self, request: gr.Request) -> None:
        self.api.cancel(request.session_hash or "")

    def reuse_seed(self, seeds: list, selected: int, request: gr.Request):
        if not seeds:
            return gr.skip(), i18n.message(_lang(request), "no_seed")
        seed = seeds[selected] if 0 <= selected < len(seeds) else seeds[0]
        return str(seed), gr.skip()


def _selected_index(evt: gr.SelectData) -> int:
    return evt.index if isinstance(evt.index, int) else 0


def _default(fields: list[Field], name: str):
    return next((field.default for field in fields if field.name == name), None)


def i18n_label(key: str):
    """A word the browser translates (``gr.I18n``): Japanese or English by its language."""
    return I18N(key)


I18N = gr.I18n(**i18n.gradio_translations())


def widget(field: Field, special: str | None = None):
    """The Gradio component for one schema field: its label, description with bounds, default and choices."""
    label = I18N(f"field.{field.name}") if field.name in i18n.FIELD_LABELS["ja"] else field.name
    info = " ".join(part for part in (field.description, _range(field)) if part)
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


def _range(field: Field) -> str:
    return f"({field.bounds_text})" if field.bounds_text and field.kind in ("integer", "number") else ""


def _step(span: float) -> float:
    return 0.01 if span <= 2 else 0.1


# ---- running it -------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_server(weights: str, setup_timeout: float) -> Iterator[str]:
    """coglet on a free loopback port with ``weights`` (the tiny checkpoint when there are none, as ``make demo``)."""
    from jsd.tiny import ensure_weights

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
        fields = input_fields(api.schema())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jsd-playground-")))
        os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")  # Gradio's upload and output cache, removed with tmp
        (tmp / "outputs").mkdir()
        demo = Playground(api, fields, tmp / "outputs").build()
        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        _stop_on_sigterm()
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
                js=CTRL_ENTER_JS,
                allowed_paths=[str(tmp / "outputs")],
                footer_links=[],
            )
        finally:
            demo.close()  # stops Gradio's server thread, or the interpreter waits for it at exit
