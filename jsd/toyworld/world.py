"""The toy world: Japanese-captioned pictures of one flat shape, generated deterministically.

A scene is a background (白, 黒, 灰色), one shape (丸, 三角, 四角, 星) of one color (赤, 青, 緑, 黄, 紫, 橙,
白, 黒; never the background's), at one position (左, 右, 上, 下, 中央) in one size (大きい, 小さい), drawn at
128×128 (the smallest served size). Captions come from several templates with orthographic variants
(赤い/あかい, 丸/円/まる …), so the tokenizer matters. Some (color, shape) combinations are held out of
the training data, to measure composition.

The same seed always gives the same images and captions. The pictures are written as an image folder
with ``metadata.jsonl`` and as WebDataset shards: both inputs of ``scripts/train.py``
(:mod:`jsd.training.data` reads them; its ``METADATA_FILE`` is this folder's metadata file).
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from jsd.training.data import METADATA_FILE

SIZE = 128  # pixels, the smallest side the server accepts
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"白": (255, 255, 255), "黒": (0, 0, 0), "灰色": (128, 128, 128)}
COLORS: dict[str, tuple[int, int, int]] = {
    "赤": (225, 25, 25),
    "青": (30, 70, 235),
    "緑": (20, 165, 45),
    "黄": (245, 225, 25),
    "紫": (140, 45, 190),
    "橙": (250, 135, 0),
    "白": (255, 255, 255),
    "黒": (0, 0, 0),
}
# A color no training caption names: the new word a LoRA learns (docs/toy-world.md). Never in all_scenes().
NEW_COLORS: dict[str, tuple[int, int, int]] = {"桜色": (245, 140, 190)}
SHAPES = ("丸", "三角", "四角", "星")
# Centres of the five positions (x, y), in pixels: 28 from the centre, so a large shape stays inside the picture.
POSITIONS: dict[str, tuple[int, int]] = {
    "左": (36, 64),
    "右": (92, 64),
    "上": (64, 36),
    "下": (64, 92),
    "中央": (64, 64),
}
# Side of the box the shape fills, in pixels. A shape covers 5-25 % of the picture: at 46 and 26 px (3-8 %) the
# toy VAE's round trip read 81 % of colors after 500 steps, at 64 and 40 px 93 % (docs/toy-world.md), and the
# UNet's loss sees the shape's words in that many more pixels.
SIZES: dict[str, int] = {"大きい": 62, "小さい": 40}
JITTER = 3  # pixels of random offset of the centre and of the box side
# One held-out (color, shape) per shape and per color: never in the training data.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("赤", "星"), ("青", "三角"), ("緑", "四角"), ("黄", "丸")})

# Words as captions spell them: the first is the canonical spelling, the others its variants.
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "赤": ("赤い", "あかい", "赤色の"),
    "青": ("青い", "あおい", "青色の"),
    "緑": ("緑の", "みどりの", "緑色の"),
    "黄": ("黄色い", "きいろい", "黄色の"),
    "紫": ("紫の", "むらさきの", "紫色の"),
    "橙": ("橙色の", "オレンジの", "だいだい色の"),
    "白": ("白い", "しろい", "白色の"),
    "黒": ("黒い", "くろい", "黒色の"),
    "桜色": ("桜色の", "さくら色の"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "丸": ("丸", "円", "まる"),
    "三角": ("三角", "三角形", "さんかく"),
    "四角": ("四角", "四角形", "しかく"),
    "星": ("星", "星形", "ほし"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "左": ("左", "ひだり"),
    "右": ("右", "みぎ"),
    "上": ("上", "うえ"),
    "下": ("下", "した"),
    "中央": ("中央", "真ん中"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"大きい": ("大きい", "おおきい"), "小さい": ("小さい", "ちいさい")}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "白": ("白い背景", "白地"),
    "黒": ("黒い背景", "黒地"),
    "灰色": ("灰色の背景", "グレーの背景"),
}
# Caption templates; every one names color, shape and position. {bg} is a background phrase.
TEMPLATES = (
    "{bg}、{pos}に{size}{color}{shape}",
    "{pos}に{size}{color}{shape}、{bg}",
    "{bg}の{pos}に{color}{shape}",
    "{size}{color}{shape}が{pos}にある{bg}",
    "{color}{shape}、{pos}、{size}、{bg}",
)


@dataclass(frozen=True)
class Scene:
    """What one picture shows: every attribute by its canonical word."""

    background: str
    color: str
    shape: str
    position: str
    size: str

    def caption(self, template: int = 0, variant: int = 0) -> str:
        """A Japanese caption; ``template`` indexes :data:`TEMPLATES`, ``variant`` picks the spellings."""

        def word(table: dict[str, tuple[str, ...]], key: str) -> str:
            options = table[key]
            return options[variant % len(options)]

        return TEMPLATES[template % len(TEMPLATES)].format(
            bg=word(BACKGROUND_WORDS, self.background),
            pos=word(POSITION_WORDS, self.position),
            size=word(SIZE_WORDS, self.size),
            color=word(COLOR_WORDS, self.color),
            shape=word(SHAPE_WORDS, self.shape),
        )

    def prompt(self) -> str:
        """The canonical caption (first template, first spellings): what the semantic tests ask for."""
        return self.caption(0, 0)


def all_scenes() -> list[Scene]:
    """Every valid scene (the shape's color differs from the background's), in a fixed order."""
    return [
        Scene(bg, color, shape, pos, size)
        for bg in BACKGROUNDS
        for color in COLORS
        if color != bg
        for shape in SHAPES
        for pos in POSITIONS
        for size in SIZES
    ]


def training_scenes() -> list[Scene]:
    """The scenes of the training data: :func:`all_scenes` without the :data:`HELD_OUT` combinations."""
    return [s for s in all_scenes() if (s.color, s.shape) not in HELD_OUT]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if (s.color, s.shape) in HELD_OUT]


# ------------------------------------------------------------------------------------------ drawing
def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """The polygon of ``shape`` filling ``box`` (left, top, right, bottom); ``None`` for 丸 (an ellipse)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "丸":
        return None
    if shape == "四角":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "三角":
        return [(x0 + w / 2, y0), (x1, y1), (x0, y1)]
    if shape == "星":  # a five-pointed star, point up, scaled so that its bounding box is ``box``
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
        return [(x0 + (px - lo_x) / (hi_x - lo_x) * w, y0 + (py - lo_y) / (hi_y - lo_y) * h) for px, py in points]
    raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    polygon = shape_polygon(shape, box)
    if polygon is None:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """The picture of ``scene``; ``rng`` jitters the centre and size by up to :data:`JITTER` pixels."""
    jitter = (lambda: rng.randint(-JITTER, JITTER)) if rng else (lambda: 0)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + jitter(), cy + jitter()
    side = SIZES[scene.size] + jitter()
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    draw_shape(ImageDraw.Draw(image), scene.shape, box, (COLORS | NEW_COLORS)[scene.color])
    return image


# ------------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class Example:
    key: str
    scene: Scene
    caption: str
    image: Image.Image
    template: int = 0  # the caption's template and spelling variant (Scene.caption's arguments)
    variant: int = 0

    def metadata(self, file_name: str) -> dict:
        return {"file_name": file_name, "text": self.caption, **asdict(self.scene)}


def examples(count: int, *, seed: int = 0, scenes: list[Scene] | None = None) -> Iterator[Example]:
    """``count`` captioned pictures: scenes cycled in a seeded order, random template, spelling and jitter."""
    scenes = list(scenes if scenes is not None else training_scenes())
    rng = random.Random(seed)
    order: list[Scene] = []
    for i in range(count):
        if not order:
            order = scenes[:]
            rng.shuffle(order)
        scene = order.pop()
        template, variant = rng.randrange(len(TEMPLATES)), rng.randrange(6)
        yield Example(f"{i:06d}", scene, scene.caption(template, variant), render(scene, rng), template, variant)


def corrupted(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with its color or its shape (one of the two, at random) swapped for another valid one: the
    wrong caption of a picture, as a data filter must catch it."""
    if rng.random() < 0.5:
        colors = [c for c in COLORS | NEW_COLORS if c not in (scene.color, scene.background)]
        return replace(scene, color=rng.choice(colors))
    return replace(scene, shape=rng.choice([s for s in SHAPES if s != scene.shape]))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(folder: str | Path, items: Iterator[Example] | list[Example]) -> Path:
    """PNG files plus ``metadata.jsonl`` (``file_name``, ``text`` and the scene's attributes per line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        name = f"{item.key}.png"
        item.image.save(folder / name)
        lines.append(json.dumps(item.metadata(name), ensure_ascii=False))
    (folder / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_shards(folder: str | Path, items: Iterator[Example] | list[Example], *, per_shard: int = 500) -> list[Path]:
    """WebDataset tar shards ``shard-000000.tar`` …: ``KEY.png`` and ``KEY.json`` (``text`` + attributes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = list(items)
    paths: list[Path] = []
    for first in range(0, len(items), per_shard):
        paths.append(folder / f"shard-{len(paths):06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for item in items[first : first + per_shard]:
                meta = json.dumps(item.metadata(f"{item.key}.png"), ensure_ascii=False).encode("utf-8")
                for name, data in ((f"{item.key}.png", png_bytes(item.image)), (f"{item.key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0  # fixed mtime: the same bytes on every run
                    tar.addfile(info, io.BytesIO(data))
    return paths
