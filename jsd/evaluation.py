"""Did the fine-tune help? One image per held-out prompt at fixed seeds, scored by a Japanese CLIP.

    python -m jsd evaluate --weights out/stage2                                  # the shipped prompts
    python -m jsd evaluate --weights weights --lora_weights lora.tar --compare weights   # LoRA vs base
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m jsd evaluate --weights out/stage2                # prompts split over 2

Prompt ``i`` of the file is generated with seed ``seed + i`` through :class:`jsd.serving.ImageGenerator`
(the same path as a prediction), so every image can be reproduced alone with ``jsd generate``. The
report gives the mean score with a 95% Student-t confidence interval; ``--compare`` generates the same
prompts at the same seeds with other weights or another LoRA and gives the paired difference (A − B)
with its own t interval: when that interval lies above 0, A scores higher on prompts like these.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = "data/eval_prompts_ja.txt"  # package data of jsd: the held-out prompts written for this project
CONFIDENCE = 0.95
REPORT_JSON, REPORT_MD, SHEET_FILE, IMAGES_FOLDER = "report.json", "report.md", "contact_sheet.png", "images"


class EvaluationError(ValueError):
    """A bad input of an evaluation; the message names it (the user's own file or flag) and what is allowed."""


# ---------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike | None = None, *, name: str = "--prompts") -> list[str]:
    """The prompts of a UTF-8 file, one per line; blank lines and lines starting with ``#`` are skipped.

    ``None``: the held-out set shipped with jsd (``jsd/data/eval_prompts_ja.txt``, 50 prompts).
    Raises :class:`EvaluationError` naming ``name`` and the file when it is missing, not UTF-8 or empty.
    """
    if path is None:
        data = resources.files("jsd").joinpath(DEFAULT_PROMPTS).read_bytes()
        label = f"jsd's {DEFAULT_PROMPTS}"
    else:
        label = f"`{name}` {path}"
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise EvaluationError(f"{label}: no such file.") from None
        except OSError as err:
            raise EvaluationError(f"{label} cannot be read ({type(err).__name__}: {err}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise EvaluationError(
            f"{label} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): save it as UTF-8."
        ) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise EvaluationError(
            f"{label} holds no prompt: write one prompt per line (lines starting with # are skipped)."
        )
    return prompts


# ---------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval by Student's t (``mean ± t(1-α/2, n-1) · sd/√n``)."""

    mean: float
    low: float | None  # None: fewer than 2 values, no interval
    high: float | None
    sd: float | None
    n: int
    confidence: float = CONFIDENCE
    method: str = "Student t"

    def describe(self, unit: str = "") -> str:
        if self.low is None:
            return f"{self.mean:.2f}{unit} (n={self.n}: no interval from one value)"
        return (
            f"{self.mean:.2f}{unit}, {self.confidence:.0%} CI [{self.low:.2f}, {self.high:.2f}] "
            f"({self.method}, n={self.n})"
        )


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE, *, method: str = "Student t") -> Interval:
    """The mean of ``values`` with its Student-t confidence interval (sample standard deviation, n-1 df)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values: a mean needs at least one")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, None, n, confidence, method)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, confidence, method)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


# ---------------------------------------------------------------------------------------- generating
@dataclass
class EvalSettings:
    """How every image is generated (diffusers' names); prompt ``i`` uses seed ``seed + i``."""

    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str | None = None  # None: jsd.serving's default
    negative_prompt: str = ""


@dataclass
class Arm:
    """One side of an evaluation: a loaded generator (its default LoRA, if any, is applied), the LoRA scale and
    the fast mode (its steps, guidance and scheduler replace the settings' defaults, as in a prediction)."""

    label: str
    generator: object  # jsd.serving.ImageGenerator, with set_default_lora()/set_fast_loras() done by the caller
    lora_scale: float = 1.0
    fast_mode: str = "off"


@dataclass
class Row:
    """One prompt's image and score in one arm."""

    index: int
    prompt: str
    seed: int
    clip_score: float
    png: bytes = field(repr=False, default=b"")


def make_request(prompt: str, index: int, settings: EvalSettings, *, lora_scale: float = 1.0, fast_mode: str = "off"):
    """The :class:`jsd.serving.GenerationRequest` of prompt ``index``: one PNG at seed ``seed + index``."""
    from jsd.serving import DEFAULT_SCHEDULER, GenerationRequest

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=settings.negative_prompt,
        width=settings.width,
        height=settings.height,
        num_outputs=1,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        scheduler=settings.scheduler or DEFAULT_SCHEDULER,
        seed=settings.seed + index,
        output_format="png",
        # A flagged image would leave a hole in the paired comparison; the images stay on the user's disk.
        disable_safety_checker=True,
        lora_scale=lora_scale,
        fast_mode=fast_mode,
    )


def check_requests(
    prompts: Sequence[str], settings: EvalSettings, *, source: str = "`--prompts`", fast_mode: str = "off"
) -> None:
    """Validate every request before any model work; a bad prompt is an :class:`EvaluationError` naming
    ``source`` (the prompt file) and the prompt's number; a bad setting raises :class:`jsd.serving.InputError`."""
    from jsd.serving import InputError

    for i, prompt in enumerate(prompts):
        try:
            make_request(prompt, 0, settings, fast_mode=fast_mode).validate()
        except InputError as err:
            if "`prompt`" not in str(err):  # a setting (width, steps …): the same for every prompt
                raise
            raise EvaluationError(f"{source}: prompt {i + 1} ({prompt[:20]!r}…): {err}") from None


def evaluate_arm(
    arm: Arm, scorer, prompts: Sequence[str], settings: EvalSettings, *, state=None, batch_size: int = 16
) -> list[Row]:
    """Generate and score this process's share of ``prompts``, gathered in prompt order.

    The prompts are cut into batches of ``batch_size`` and batch ``k`` goes to process ``k % num_processes``:
    every batch is scored whole, so the scores do not depend on the number of processes.
    """
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    mine = batches[rank::world]
    show = state is None or state.is_local_main_process
    rows = []
    with tqdm(total=sum(map(len, mine)), desc=f"Generating ({arm.label})", unit="image", disable=not show) as bar:
        for batch in mine:
            images = []
            for i in batch:
                request = make_request(prompts[i], i, settings, lora_scale=arm.lora_scale, fast_mode=arm.fast_mode)
                images.append(arm.generator.generate(request).images[0].image)
                bar.update(1)
            scores = scorer.score(images, [prompts[i] for i in batch], batch_size=batch_size).tolist()
            rows += [
                Row(i, prompts[i], settings.seed + i, float(score), _png(image))
                for i, image, score in zip(batch, images, scores, strict=True)
            ]
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return sorted(rows, key=lambda r: r.index)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- the report
@dataclass
class ArmResult:
    label: str
    rows: list[Row]

    @property
    def interval(self) -> Interval:
        return t_interval([r.clip_score for r in self.rows])


@dataclass
class Evaluation:
    """Scores per prompt for one or two arms, their means and (two arms) the paired difference A − B."""

    settings: EvalSettings
    arms: list[ArmResult]

    @property
    def difference(self) -> Interval | None:
        if len(self.arms) < 2:
            return None
        a, b = self.arms
        diffs = [ra.clip_score - rb.clip_score for ra, rb in zip(a.rows, b.rows, strict=True)]
        return t_interval(diffs, method="paired Student t")

    def verdict(self) -> str | None:
        diff = self.difference
        if diff is None:
            return None
        a, b = (arm.label for arm in self.arms)
        if diff.low is None:
            return "one prompt: no interval, no verdict"
        if diff.low > 0:
            return f"A ({a}) scores higher than B ({b}): the interval lies above 0"
        if diff.high < 0:
            return f"A ({a}) scores lower than B ({b}): the interval lies below 0"
        return "no clear difference: the interval contains 0 (more prompts would narrow it)"

    def to_json(self) -> dict:
        out = {
            "settings": asdict(self.settings),
            "scores": "Japanese CLIP score = 100 × max(cos(image, prompt), 0)",
            "arms": [
                {
                    "label": arm.label,
                    "mean": asdict(arm.interval),
                    "prompts": [{k: v for k, v in asdict(r).items() if k != "png"} for r in arm.rows],
                }
                for arm in self.arms
            ],
        }
        if self.difference is not None:
            out["difference_a_minus_b"] = asdict(self.difference) | {"verdict": self.verdict()}
        return out

    def table(self) -> str:
        """A Markdown table: one row per prompt, then the means (and the difference)."""
        arms = self.arms
        head = "| # | seed | " + " | ".join(f"{'AB'[k]}: score" for k in range(len(arms))) + " | prompt |"
        lines = [head, "|---:|---:|" + "---:|" * len(arms) + "---|"]
        for rows in zip(*(arm.rows for arm in arms), strict=True):
            scores = " | ".join(f"{r.clip_score:.2f}" for r in rows)
            lines.append(f"| {rows[0].index + 1} | {rows[0].seed} | {scores} | {rows[0].prompt} |")
        lines.append("")
        for k, arm in enumerate(arms):
            lines.append(f"- {'AB'[k]} = {arm.label}: mean Japanese CLIP score {arm.interval.describe()}")
        if self.difference is not None:
            lines.append(f"- difference A − B: {self.difference.describe()}; {self.verdict()}")
        return "\n".join(lines) + "\n"


def write_report(evaluation: Evaluation, output_dir: str | os.PathLike, *, font=None) -> dict[str, Path]:
    """``report.json``, ``report.md``, ``contact_sheet.png`` and every image (``images/A/001.png`` …)."""
    from jsd.drawing import SheetCell, contact_sheet, japanese_font

    out = Path(output_dir)
    paths = {"report": out / REPORT_JSON, "markdown": out / REPORT_MD, "sheet": out / SHEET_FILE}
    for k, arm in enumerate(evaluation.arms):
        folder = out / IMAGES_FOLDER / "AB"[k]
        folder.mkdir(parents=True, exist_ok=True)
        for row in arm.rows:
            (folder / f"{row.index + 1:03d}.png").write_bytes(row.png)
    paths["report"].write_text(json.dumps(evaluation.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    font = font or japanese_font(14)
    note = "" if font.japanese else "\n(No Japanese font was found: the contact sheet numbers the prompts.)\n"
    paths["markdown"].write_text(evaluation.table() + note, encoding="utf-8")
    cells = []
    for rows in zip(*(arm.rows for arm in evaluation.arms), strict=True):
        scores = " | ".join(f"{'AB'[k]} {r.clip_score:.1f}" for k, r in enumerate(rows))
        images = [Image.open(io.BytesIO(r.png)) for r in rows]
        cells.append(SheetCell(images=images, heading=f"#{rows[0].index + 1}  {scores}", caption=rows[0].prompt))
    contact_sheet(cells, font, legend=sheet_legend(evaluation), image_labels="AB").save(paths["sheet"])
    return paths


def sheet_legend(evaluation: Evaluation) -> list[str]:
    """The contact sheet's first lines: which image of a cell is which side."""
    sides = [f"{'AB'[k]} = {arm.label}" for k, arm in enumerate(evaluation.arms)]
    if len(sides) == 1:
        return sides
    return ["Each prompt: A on the left, B on the right (the difference reported is A - B)", *sides]
