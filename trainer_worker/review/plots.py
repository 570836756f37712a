"""A training run's curves as PNG bytes: its loss terms, its learning rate and its
validation mAP, one point per epoch. Pure functions of the per-epoch series the run
reports (shared.metrics names); matplotlib loads only when a plot is drawn."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.metrics import LEARNING_RATE, MAP, MAP_50, MAP_75, TOTAL_LOSS, is_loss

WIDTH_PX = 800
HEIGHT_PX = 450
_DPI = 100
# The validation metrics drawn, with their labels.
VAL_CURVES = ((MAP, "mAP@[.50:.95]"), (MAP_50, "mAP@.50"), (MAP_75, "mAP@.75"))


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochPoint:
    """One epoch of a run's series: mean train losses and the lr, and its validation."""

    epoch: int
    train: Mapping[str, float] = field(default_factory=dict)
    val: Mapping[str, float] = field(default_factory=dict)


def loss_plot(epochs: Sequence[EpochPoint], *, width_px: int = WIDTH_PX) -> bytes:
    """Each loss term's epoch mean, the total loss drawn thicker."""
    names = sorted({k for e in epochs for k in e.train if is_loss(k)})
    names.sort(key=lambda name: name != TOTAL_LOSS)
    lines = [(name, _series(epochs, "train", name)) for name in names]
    return _plot(
        lines,
        title="training loss (epoch mean)",
        ylabel="loss",
        width_px=width_px,
        thick={TOTAL_LOSS},
    )


def learning_rate_plot(epochs: Sequence[EpochPoint], *, width_px: int = WIDTH_PX) -> bytes:
    """The learning rate at each epoch's last iteration."""
    return _plot(
        [(LEARNING_RATE, _series(epochs, "train", LEARNING_RATE))],
        title="learning rate (end of epoch)",
        ylabel="learning rate",
        width_px=width_px,
    )


def val_map_plot(
    epochs: Sequence[EpochPoint], *, best_epoch: int | None, width_px: int = WIDTH_PX
) -> bytes:
    """The validation mAPs per epoch and a marker at the best epoch (the model's)."""
    lines = [(label, _series(epochs, "val", key)) for key, label in VAL_CURVES]
    return _plot(
        lines,
        title="validation mAP",
        ylabel="mAP",
        width_px=width_px,
        marked_epoch=best_epoch,
        ylim=(0.0, 1.0),
    )


def _series(epochs: Sequence[EpochPoint], part: str, key: str) -> list[tuple[int, float]]:
    points = []
    for entry in sorted(epochs, key=lambda e: e.epoch):
        value = (entry.train if part == "train" else entry.val).get(key)
        # COCO's -1 (nothing to evaluate) and non-finite values are no point of a curve.
        if value is not None and math.isfinite(value) and not (part == "val" and value < 0):
            points.append((entry.epoch, float(value)))
    return points


def _plot(
    lines: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    *,
    title: str,
    ylabel: str,
    width_px: int,
    thick: set[str] | None = None,
    marked_epoch: int | None = None,
    ylim: tuple[float, float] | None = None,
) -> bytes:
    # Agg through the object API: no pyplot state, no display, nothing at import time.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    height_px = round(width_px * HEIGHT_PX / WIDTH_PX)
    figure = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes: Any = figure.add_subplot()
    drawn = [(label, points) for label, points in lines if points]
    for label, points in drawn:
        xs, ys = zip(*points, strict=True)
        width = 2.5 if thick and label in thick else 1.5
        axes.plot(xs, ys, marker="o", markersize=4, linewidth=width, label=label)
    if marked_epoch is not None and drawn:
        axes.axvline(marked_epoch, color="0.4", linestyle=":", label=f"best epoch {marked_epoch}")
    if not drawn:
        axes.text(
            0.5, 0.5, "no values reported", ha="center", va="center", transform=axes.transAxes
        )
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(True, alpha=0.3)
    if drawn:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=_DPI)
    return out.getvalue()
