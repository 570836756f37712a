"""A tiny synthetic COCO dataset for demos and tests: nothing is downloaded.

Each class is a distinct shape in a distinct colour (filled rectangle, filled
ellipse, ring, triangle, ...) on a noisy background, so a detector can learn it
in a few epochs; each box is the shape's exact extent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = (
    (150, 90, 40),
    (25, 25, 25),
    (40, 160, 60),
    (200, 40, 40),
    (40, 80, 200),
    (220, 200, 40),
)
_SHAPES = ("rectangle", "ring", "ellipse", "triangle")


def make_dataset(
    folder: Path,
    *,
    images: int = 16,
    size: int = 128,
    classes: tuple[str, ...] = ("dump", "tire"),
    seed: int = 0,
    objects_per_image: tuple[int, int] = (1, 3),
) -> Path:
    """Writes `images` PNGs and `annotations.json` into `folder`; returns the annotation path.

    Category ids start at 1 in the order of `classes`; every class appears in at
    least `images // len(classes)` images.
    """
    if not classes:
        raise ValueError("at least one class is needed")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(images):
        pixels = noise.normal(120, 18, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[int, int, int, int]] = []
        for k in range(rng.randint(*objects_per_image)):
            label = (index + k) % len(classes)
            box = _free_box(rng, size, placed)
            if box is None:
                continue
            placed.append(box)
            _draw(draw, _SHAPES[label % len(_SHAPES)], box, _COLOURS[label % len(_COLOURS)])
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        file_name = f"images/{index + 1:05d}.png"
        canvas.save(folder / file_name)
        coco_images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
    document = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(document))
    return path


def _free_box(
    rng: random.Random, size: int, placed: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    low, high = max(8, size // 5), max(10, size * 2 // 5)
    for _ in range(20):
        w, h = rng.randint(low, high), rng.randint(low, high)
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        box = (x0, y0, x0 + w, y0 + h)
        if all(_apart(box, other) for other in placed):
            return box
    return None


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _draw(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    colour: tuple[int, int, int],
) -> None:
    # PIL includes the end pixel; the COCO box [x0, x1) excludes it.
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "ring":
        width = max(3, min(x1 - x0, y1 - y0) // 4)
        draw.ellipse((x0, y0, x1, y1), outline=colour, width=width)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
