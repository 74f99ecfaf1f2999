"""The measuring instrument of the toy world: what a picture shows, read from its pixels alone.

Deterministic, no learned weights, and it never looks at a caption:

* background: the palette background nearest to the median of the border pixels;
* foreground: the pixels far from that background color; their median color is the shape's color
  (the nearest palette color other than the background's);
* shape: the template (ellipse, triangle, square, star) filling the foreground's bounding box that
  overlaps the foreground best (intersection over union);
* position: the nearest of the five centres to the foreground's centroid;
* size: the side of the bounding box (large above the midpoint of the two sizes).

Generated images (blurrier, noisier) are read the same way; a picture without a foreground reads as
``None`` for every attribute but the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from jsd.toyworld.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZE, SIZES, Scene, draw_shape

FOREGROUND_DISTANCE = 80.0  # RGB distance from the background above which a pixel is foreground
MIN_FOREGROUND = 12  # pixels; fewer means "nothing drawn"
SIZE_THRESHOLD = sum(SIZES.values()) / 2
ATTRIBUTES = ("background", "color", "shape", "position", "size")


@dataclass(frozen=True)
class Reading:
    """The judge's verdict; ``None`` where nothing was drawn."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    size: str | None

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Per attribute, whether this reading agrees with ``scene``."""
        return {name: getattr(self, name) == getattr(scene, name) for name in ATTRIBUTES}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], exclude: str | None = None) -> str:
    names = [n for n in palette if n != exclude]
    distances = [float(np.linalg.norm(rgb - np.array(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(distances))]


def _as_array(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def foreground_mask(pixels: np.ndarray, background: str) -> np.ndarray:
    distance = np.linalg.norm(pixels - np.array(BACKGROUNDS[background], dtype=np.float32), axis=-1)
    return distance > FOREGROUND_DISTANCE


def template_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """``shape`` filling ``box`` (left, top, right, bottom; inclusive pixels), as a boolean mask."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    x0, y0, x1, y1 = box
    draw_shape(ImageDraw.Draw(canvas), shape, (x0, y0, x1 + 1, y1 + 1), 255)
    return np.asarray(canvas) > 127


def read_shape(mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    scores = []
    for shape in SHAPES:
        template = template_mask(shape, box)
        union = np.logical_or(mask, template).sum()
        scores.append(np.logical_and(mask, template).sum() / max(union, 1))
    return SHAPES[int(np.argmax(scores))]


def read(image: Image.Image, colors: dict[str, tuple[int, int, int]] = COLORS) -> Reading:
    """What ``image`` shows (any size; read at 128×128); ``colors``: the palette its color is read from
    (``COLORS | NEW_COLORS`` where a picture may show the new word a LoRA learned)."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[:4].reshape(-1, 3), pixels[-4:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :4].reshape(-1, 3), pixels[:, -4:].reshape(-1, 3)])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    mask = foreground_mask(pixels, background)
    if mask.sum() < MIN_FOREGROUND:
        return Reading(background, None, None, None, None)
    color = _nearest(np.median(pixels[mask], axis=0), colors, exclude=background)
    ys, xs = np.nonzero(mask)
    # the bounding box of the central 98 % of the foreground: a few stray pixels do not stretch it
    x0, x1 = (int(v) for v in np.percentile(xs, (1, 99)))
    y0, y1 = (int(v) for v in np.percentile(ys, (1, 99)))
    shape = read_shape(mask, (x0, y0, x1, y1))
    centre = np.array([xs.mean(), ys.mean()])
    names = list(POSITIONS)
    position = names[int(np.argmin([np.linalg.norm(centre - np.array(POSITIONS[n])) for n in names]))]
    side = max(x1 - x0, y1 - y0) + 1
    size = "大きい" if side > SIZE_THRESHOLD else "小さい"
    return Reading(background, color, shape, position, size)


def agreement(images: list[Image.Image], scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the share of ``images`` whose reading matches the scene asked for."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    hits = {name: 0 for name in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        for name, ok in read(image).matches(scene).items():
            hits[name] += ok
    return {name: hits[name] / max(len(images), 1) for name in ATTRIBUTES}
