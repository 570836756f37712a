"""Pictures of a review, as PNG bytes: one image with its true and predicted boxes, and
a class's precision-recall curves. matplotlib loads only when a plot is drawn."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from trainer_worker.review.inputs import Detection
from trainer_worker.review.results import IOU_50, PrCurve

TRUE_COLOUR = (0, 200, 0)
PREDICTED_COLOUR = (255, 0, 255)
_LINE_WIDTH = 2


def render_sample(
    image: Image.Image,
    *,
    truths: Sequence[Mapping[str, Any]],
    detections: Sequence[Detection],
    class_names: Mapping[int, str],
    score_threshold: float = 0.0,
    scale: float = 1.0,
) -> bytes:
    """A PNG of `image` scaled by `scale`, its true boxes (COCO annotations) in
    TRUE_COLOUR with the class name, and its detections with score >= `score_threshold`
    in PREDICTED_COLOUR with class and score."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    canvas = image.convert("RGB")
    if scale != 1.0:
        size = (max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale)))
        canvas = canvas.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    # Pillow's own font (FreeType when Pillow has it), readable at any image size.
    font = ImageFont.load_default(size=max(10, round(min(canvas.size) / 24)))
    for truth in truths:
        label = class_names[truth["category_id"]]
        _box(draw, font, truth["bbox"], scale, TRUE_COLOUR, label, above=True)
    for detection in sorted(detections, key=lambda d: d["score"]):
        if detection["score"] >= score_threshold:
            label = f"{class_names[detection['category_id']]} {detection['score']:.2f}"
            _box(draw, font, detection["bbox"], scale, PREDICTED_COLOUR, label, above=False)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _box(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    bbox: Sequence[float],
    scale: float,
    colour: tuple[int, int, int],
    label: str,
    *,
    above: bool,
) -> None:
    x, y, w, h = (v * scale for v in bbox)
    # COCO's box excludes its end pixel; PIL's rectangle includes it.
    draw.rectangle((x, y, max(x, x + w - 1), max(y, y + h - 1)), outline=colour, width=_LINE_WIDTH)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    text_h = bottom - top
    # True labels sit above the box's top, predicted ones inside its bottom, so a true
    # and a predicted box of one object do not hide each other's label.
    bottom_y = max(y, y + h - text_h - 2 - _LINE_WIDTH)
    origin = (x, y - text_h - 2 if above and y >= text_h + 2 else (y if above else bottom_y))
    draw.rectangle(
        (origin[0], origin[1], origin[0] + right - left + 2, origin[1] + text_h + 2), fill=colour
    )
    draw.text((origin[0] + 1, origin[1] - top + 1), label, fill=(0, 0, 0), font=font)


def render_pr_curves(
    curves: Sequence[PrCurve], *, title: str = "", width_px: int = 640, height_px: int = 480
) -> bytes:
    """A PNG plot of precision over recall, one line per curve, labelled with its class,
    IoU and AP; `width_px` x `height_px` pixels."""
    # Agg through the object API: no pyplot state, no display, nothing at import time.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # One colour per class (matplotlib's cycle, C0 first), dashed when averaged over IoU.
    colours: dict[str, str] = {}
    for curve in curves:
        colour = colours.setdefault(curve.class_name, f"C{len(colours) % 10}")
        axes.plot(
            curve.recall,
            curve.precision,
            color=colour,
            linestyle="-" if curve.iou == IOU_50 else "--",
            label=f"{curve.class_name} IoU {curve.iou} AP {curve.ap:.3f}",
        )
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    if curves:
        axes.legend(loc="lower left", fontsize="small")
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi)
    return out.getvalue()
