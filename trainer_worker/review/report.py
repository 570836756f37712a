"""A training run's report: one self-contained HTML page, to be read offline or from a
download, with the run's curves, its dataset, its per-class AP and pictures of the
kept model's predictions.

Pure: it renders what it is given. Every picture is embedded as a data: URI and the
page loads nothing (its Content-Security-Policy forbids it), and every text that came
from a dataset or a request (class names, file names, the run's name) is escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shared.metrics import MAP, MAP_50, MAP_75

# The page may show pictures given inline and use its own style; nothing else.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_SUMMARY_METRICS = ((MAP, "mAP@[.50:.95]"), (MAP_50, "mAP@.50"), (MAP_75, "mAP@.75"))


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetFacts:
    fingerprint: str
    classes: tuple[str, ...]
    image_count: int
    annotation_count: int
    instances_per_class: Mapping[str, int]
    train_image_count: int
    val_image_count: int
    test_image_count: int
    split_source: str
    split_seed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationFacts:
    """The evaluation that describes the model: its test split's, else its best val."""

    split: str
    epoch: int
    image_count: int
    metrics: Mapping[str, float]
    per_class_ap: Mapping[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplePicture:
    """One image with its true and predicted boxes (trainer_worker.review.render)."""

    group: str  # "worst" | "best"
    file_name: str
    tp: int
    fp: int
    fn: int
    png: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Plot:
    title: str
    png: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingReport:
    title: str
    architecture: str
    best_epoch: int
    epochs_trained: int
    duration_s: float
    device: str
    dataset: DatasetFacts
    evaluation: EvaluationFacts
    plots: Sequence[Plot] = ()
    samples: Sequence[SamplePicture] = ()
    # The thresholds the samples were matched at; why there are none when there are none.
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    samples_note: str = ""
    notes: Sequence[str] = field(default_factory=tuple)


def render_html(report: TrainingReport) -> str:
    """The page, as text (UTF-8 when stored)."""
    e = _escape
    body = [
        f"<h1>{e(report.title)}</h1>",
        _facts_table(report),
        "<h2>Curves</h2>",
        *(
            f'<figure><img alt="{e(p.title)}" src="{_data_uri(p.png)}">'
            f"<figcaption>{e(p.title)}</figcaption></figure>"
            for p in report.plots
        ),
        "<h2>Dataset</h2>",
        _dataset_table(report.dataset),
        f"<h2>Per-class AP ({e(report.evaluation.split)} split)</h2>",
        _per_class_table(report),
        f"<h2>Predictions on the {e(report.evaluation.split)} split</h2>",
        _samples(report),
        *(f"<p class=note>{e(note)}</p>" for note in report.notes),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        f"<title>{e(report.title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _facts_table(report: TrainingReport) -> str:
    evaluation = report.evaluation
    rows = [
        ("architecture", report.architecture or "-"),
        ("epochs trained", str(report.epochs_trained)),
        ("best epoch (the model's weights)", str(report.best_epoch)),
        ("duration", f"{report.duration_s:.1f} s"),
        ("device", report.device or "-"),
        (
            "evaluated on",
            f"{evaluation.split} split, {evaluation.image_count} images, epoch {evaluation.epoch}",
        ),
        *((label, _number(evaluation.metrics.get(key))) for key, label in _SUMMARY_METRICS),
    ]
    return _table(("", ""), rows, header=False)


def _dataset_table(dataset: DatasetFacts) -> str:
    splits = (
        f"{dataset.train_image_count} train, {dataset.val_image_count} val, "
        f"{dataset.test_image_count} test"
    )
    how = "the dataset's own" if dataset.split_source == "dataset" else f"seed {dataset.split_seed}"
    facts = _table(
        ("", ""),
        [
            ("images", str(dataset.image_count)),
            ("annotations", str(dataset.annotation_count)),
            ("splits", f"{splits} ({how})"),
            ("fingerprint", dataset.fingerprint),
        ],
        header=False,
    )
    classes = _table(
        ("class", "instances"),
        [(name, str(dataset.instances_per_class.get(name, 0))) for name in dataset.classes],
    )
    return facts + "\n" + classes


def _per_class_table(report: TrainingReport) -> str:
    per_class = report.evaluation.per_class_ap
    if not per_class:
        return "<p>The evaluation reported no per-class AP.</p>"
    # The dataset's class order first, then any name only the evaluation knows.
    names = [n for n in report.dataset.classes if n in per_class]
    names += sorted(set(per_class) - set(names))
    return _table(("class", "AP@[.50:.95]"), [(n, _number(per_class[n])) for n in names])


def _samples(report: TrainingReport) -> str:
    if not report.samples:
        return f"<p>{_escape(report.samples_note or 'No predictions to show.')}</p>"
    parts = [
        f"<p>True boxes green, predicted boxes magenta (score &ge; {report.score_threshold:g}); "
        f"a prediction is right at IoU &ge; {report.iou_threshold:g} with a true box of its "
        "class.</p>"
    ]
    for group, heading in (("worst", "Most errors"), ("best", "Fewest errors")):
        pictures = [s for s in report.samples if s.group == group]
        if not pictures:
            continue
        parts.append(f"<h3>{heading}</h3><div class=samples>")
        for s in pictures:
            caption = f"{s.file_name}: {s.tp} right, {s.fp} false, {s.fn} missed"
            parts.append(
                f'<figure><img alt="{_escape(s.file_name)}" src="{_data_uri(s.png)}">'
                f"<figcaption>{_escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    return "\n".join(parts)


def _table(
    columns: tuple[str, str], rows: Sequence[tuple[str, str]], *, header: bool = True
) -> str:
    head = (
        "<thead><tr>" + "".join(f"<th>{_escape(c)}</th>" for c in columns) + "</tr></thead>"
        if header
        else ""
    )
    body = "".join(
        f"<tr><th scope=row>{_escape(label)}</th><td>{_escape(value)}</td></tr>"
        for label, value in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _number(value: float | None) -> str:
    # COCO's -1: the split has nothing of that kind to evaluate.
    if value is None or not math.isfinite(value) or value < 0:
        return "-"
    return f"{value:.3f}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    "td{font-variant-numeric:tabular-nums}"
    "figure{display:inline-block;margin:.5em}img{max-width:100%}"
    "figcaption{font-size:.85em;color:#555}.note{color:#555}"
)
