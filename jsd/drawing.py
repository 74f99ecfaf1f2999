"""Pictures of scores, drawn with Pillow: a histogram with the threshold marked, and a contact sheet of images.

Japanese text needs a font that has its glyphs. :func:`japanese_font` looks for one (``--font``, then
fontconfig's ``fc-list :lang=ja``, then the usual Debian paths); where there is none (a bare CI machine,
a slim container), the sheet labels each image with its number and score only, and the caller lists the
prompts by number beside it (``report.md``). ``apt-get install fonts-noto-cjk`` (or ``fonts-ipafont-gothic``)
gives the sheet its prompts.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Debian/Ubuntu paths of the Japanese fonts, for machines without fontconfig's fc-list.
JAPANESE_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
    "/usr/share/fonts/truetype/fonts-japanese-gothic.ttf",
    "/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf",
)
BACKGROUND, INK, MUTED, ACCENT, BAR = "white", (20, 20, 20), (110, 110, 110), (200, 30, 30), (70, 110, 170)


@dataclass(frozen=True)
class Font:
    """A font and whether it can draw Japanese (when it cannot, callers print prompts elsewhere)."""

    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    japanese: bool
    path: str | None = None


def japanese_font(size: int, path: str | Path | None = None) -> Font:
    """A font of ``size`` pixels that draws Japanese if one is installed, else Pillow's default (Latin only).

    ``path``: a font file chosen by the user; it must exist and load (``ValueError`` otherwise). One without
    Japanese glyphs (it would draw boxes) comes back with ``japanese=False``: callers say so.
    """
    if path is not None:
        try:
            font = ImageFont.truetype(str(path), size)
        except OSError as err:
            raise ValueError(f"`--font` {path}: not a font file Pillow can load ({err}).") from None
        return Font(font, japanese=draws_japanese(font), path=str(path))
    for candidate in (*_fontconfig_japanese(), *JAPANESE_FONT_PATHS):
        try:
            return Font(ImageFont.truetype(candidate, size), japanese=True, path=candidate)
        except OSError:
            continue
    return Font(ImageFont.load_default(size), japanese=False)


JAPANESE_SAMPLE = "日本語のかなカナ"
NO_GLYPH = "\U000efffd"  # a private-use code point of plane 14: no font draws it, so it shows the "missing" box


def draws_japanese(font: ImageFont.FreeTypeFont) -> bool:
    """Whether ``font`` has Japanese glyphs: a character it lacks is drawn as its "missing" box (.notdef)."""

    def pixels(char: str) -> bytes:
        image = Image.new("L", (2 * font.size, 2 * font.size))
        ImageDraw.Draw(image).text((0, 0), char, fill=255, font=font)
        return image.tobytes()

    missing = pixels(NO_GLYPH)
    return all(pixels(char) != missing for char in JAPANESE_SAMPLE)


def _fontconfig_japanese() -> list[str]:
    """Font files that fontconfig says cover Japanese (``fc-list :lang=ja file``), best first."""
    if shutil.which("fc-list") is None:
        return []
    try:
        out = subprocess.run(
            ["fc-list", ":lang=ja", "file"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = sorted({line.split(":")[0].strip() for line in out.splitlines() if line.strip()})
    # Sans-serif gothic faces first: they stay legible at thumbnail sizes.
    return sorted(files, key=lambda f: (not any(k in f.lower() for k in ("sans", "gothic", "ipag")), f))


def fit_lines(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` pixels (the last one ends in …)."""
    lines, line = [], ""
    for char in text:
        if font.font.getlength(line + char) > width:
            lines.append(line)
            line = char.lstrip()
        else:
            line += char
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def score_histogram(
    scores: Sequence[float], threshold: float | None, *, bin_width: float = 2.0, size: tuple[int, int] = (900, 420)
) -> Image.Image:
    """Bars of how many scores fall in each ``bin_width`` of 0..100, the threshold as a red line."""
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = round(100 / bin_width)
    counts = [0] * bins
    for score in scores:
        counts[min(int(score / bin_width), bins - 1)] += 1
    peak = max(counts) or 1
    font = ImageFont.load_default(14)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, count in enumerate(counts):
        if count:
            x0 = left + plot_w * i / bins
            x1 = left + plot_w * (i + 1) / bins - 1
            draw.rectangle([x0, top + plot_h * (1 - count / peak), x1, top + plot_h], fill=BAR)
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill=INK)
    draw.line([left, top, left, top + plot_h], fill=INK)
    for tick in range(0, 101, 10):
        x = left + plot_w * tick / 100
        draw.line([x, top + plot_h, x, top + plot_h + 5], fill=INK)
        draw.text((x, top + plot_h + 8), str(tick), fill=INK, font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 6), "Japanese CLIP score", fill=INK, font=font, anchor="mb")
    draw.text((left - 8, top), str(peak), fill=INK, font=font, anchor="rm")
    draw.text((left - 8, top + plot_h), "0", fill=INK, font=font, anchor="rm")
    title = f"{len(scores)} pairs"
    if threshold is not None:
        x = left + plot_w * threshold / 100
        draw.line([x, top - 10, x, top + plot_h], fill=ACCENT, width=3)
        below = sum(s < threshold for s in scores)
        title += f"; threshold {threshold:g}: {below} below (dropped), {len(scores) - below} kept"
        draw.text((x + 4, top - 10), f"threshold {threshold:g}", fill=ACCENT, font=font, anchor="lt")
    draw.text((left, 8), title, fill=INK, font=font, anchor="lt")
    return image


@dataclass
class SheetCell:
    """One cell of a contact sheet: its images side by side, a heading (number and scores) and a caption."""

    images: list[Image.Image]
    heading: str
    caption: str = ""


def contact_sheet(
    cells: Sequence[SheetCell],
    font: Font,
    *,
    thumb: int = 192,
    columns: int = 5,
    caption_lines: int = 2,
    legend: Sequence[str] = (),
    image_labels: Sequence[str] = (),
) -> Image.Image:
    """A grid of ``cells``; each caption (the prompt) is drawn only when ``font`` can draw it.

    ``legend``: lines above the grid (what the sides are); ``image_labels``: a tag in the corner of each cell's
    k-th image (``"A"``, ``"B"``), so that a sheet cut out of its context still says which side is which.
    """
    per_cell = max(len(c.images) for c in cells)
    line_h = int(font.font.size * 1.3) if hasattr(font.font, "size") else 14
    pad = 8
    cell_w = per_cell * thumb + (per_cell - 1) * 4
    text_lines = 1 + (caption_lines if font.japanese else 0)
    cell_h = thumb + pad + text_lines * line_h
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    top = len(legend) * line_h + (pad if legend else 0)
    sheet = Image.new("RGB", (columns * (cell_w + pad) + pad, top + rows * (cell_h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(legend):
        draw.text((pad, pad + i * line_h), line, fill=INK, font=font.font)
    for n, cell in enumerate(cells):
        x = pad + (n % columns) * (cell_w + pad)
        y = top + pad + (n // columns) * (cell_h + pad)
        for k, image in enumerate(cell.images):
            sheet.paste(image.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (x + k * (thumb + 4), y))
            if k < len(image_labels):
                _tag(draw, (x + k * (thumb + 4), y), image_labels[k], font)
        y += thumb + pad // 2
        draw.text((x, y), cell.heading, fill=INK, font=font.font)
        if font.japanese and cell.caption:
            for i, line in enumerate(fit_lines(cell.caption, font, cell_w, caption_lines)):
                draw.text((x, y + (i + 1) * line_h), line, fill=MUTED, font=font.font)
    return sheet


def _tag(draw: ImageDraw.ImageDraw, corner: tuple[int, int], text: str, font: Font) -> None:
    """``text`` in a white box at the top-left ``corner`` of an image."""
    *_, right, bottom = draw.textbbox((corner[0] + 4, corner[1] + 2), text, font=font.font)
    draw.rectangle([corner[0], corner[1], right + 4, bottom + 3], fill=BACKGROUND)
    draw.text((corner[0] + 4, corner[1] + 2), text, fill=INK, font=font.font)
