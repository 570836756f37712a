"""Renderings of what a review finds: a run's metrics per epoch (a table and a terminal
plot), model evaluations and comparisons. Pure functions of protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from cli.fitting import Fitting
from cli.render import metrics_text, state_text, timestamp
from shared.metrics import MAP, MAP_50
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2, training_run_pb2

EpochMetrics = training_run_pb2.TrainingRunMetrics.EpochMetrics
Review = common_pb2.DetectionReview

LOSS = "loss"
LR = "lr"


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def metrics_table(metrics: training_run_pb2.TrainingRunMetrics) -> Table:
    """One row per epoch: the total loss, each loss term, the learning rate, val mAPs.
    The best epoch is marked."""
    terms = sorted({k for e in metrics.epochs for k in e.train if k.startswith("loss_")})
    table = Table(
        Column("epoch", justify="right"),
        Column(LOSS, justify="right"),
        *(Column(t, justify="right") for t in terms),
        Column(LR, justify="right"),
        Column("mAP", justify="right"),
        Column("mAP50", justify="right"),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    for epoch in metrics.epochs:
        marker = " *" if epoch.epoch == metrics.best_epoch else ""
        table.add_row(
            f"{epoch.epoch}{marker}",
            _number(epoch.train.get(LOSS)),
            *(_number(epoch.train.get(t)) for t in terms),
            "—" if LR not in epoch.train else f"{epoch.train[LR]:.2e}",
            _number(epoch.val.get(MAP), 3),
            _number(epoch.val.get(MAP_50), 3),
        )
    return table


def metrics_plot(
    epochs: Sequence[EpochMetrics], *, width: int = 72, height: int = 16, color: bool = False
) -> str:
    """The loss (left axis) and the val mAP (right axis) per epoch, drawn in braille
    characters; empty when no epoch has either."""
    loss = [(e.epoch, e.train[LOSS]) for e in epochs if LOSS in e.train]
    maps = [(e.epoch, e.val[MAP]) for e in epochs if MAP in e.val]
    if not loss and not maps:
        return ""
    import plotext  # Only when a plot is drawn: it is not needed to start the CLI.

    plotext.clear_figure()
    plotext.plotsize(width, height)
    plotext.theme("clear")
    if loss:
        plotext.plot(*zip(*loss, strict=True), label="loss", marker="braille")
    if maps:
        plotext.plot(*zip(*maps, strict=True), label="mAP", marker="braille", yside="right")
    plotext.xlabel("epoch")
    drawn: str = plotext.build()
    return drawn if color else plotext.uncolorize(drawn)


def metrics_view(
    metrics: training_run_pb2.TrainingRunMetrics, *, plot: bool = True, width: int = 72
) -> RenderableType:
    """`raven runs metrics`: the table, then the plot."""
    if not metrics.epochs:
        return Text("no epoch has ended yet")
    drawn = metrics_plot(list(metrics.epochs), width=width) if plot else ""
    return Group(metrics_table(metrics), Text(drawn)) if drawn else metrics_table(metrics)


def evaluations_table(evaluations: Sequence[trained_model_pb2.ModelEvaluation]) -> Table:
    table = Table(
        Column("evaluation", no_wrap=True),
        "state",
        "split",
        Column("images", justify="right"),
        Column("dataset", no_wrap=True),
        Column("mAP", justify="right"),
        Column("mAP50", justify="right"),
        "created",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    for evaluation in evaluations:
        metrics = evaluation.evaluation.metrics
        table.add_row(
            evaluation.name.rsplit("/", 1)[-1],
            state_text(evaluation.state),
            evaluation.split,
            str(evaluation.image_count) if evaluation.image_count else "",
            evaluation.dataset_fingerprint[:12],
            _number(metrics.get(MAP), 3),
            _number(metrics.get(MAP_50), 3),
            timestamp(evaluation.create_time, short=True),
        )
    return table


def evaluation_details(evaluation: trained_model_pb2.ModelEvaluation) -> RenderableType:
    """Its identity and metrics, the AP and TP/FP/FN per class, the confusion matrix and
    the sample images."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    split = evaluation.split + (f" of {evaluation.split_of}" if evaluation.split_of else "")
    review = evaluation.review
    for label, value in (
        ("name", evaluation.name),
        ("job", evaluation.job),
        ("state", state_text(evaluation.state)),
        ("dataset", evaluation.dataset_uri),
        ("fingerprint", evaluation.dataset_fingerprint),
        ("split", f"{split}, {evaluation.image_count} images" if evaluation.image_count else split),
        ("thresholds", f"score {evaluation.score_threshold:g}, IoU {evaluation.iou_threshold:g}"),
        ("metrics", metrics_text(evaluation.evaluation) if evaluation.HasField("evaluation") else ""),
        ("failure", f"{evaluation.failure.reason}: {evaluation.failure.message}"
         if evaluation.failure.reason else ""),
    ):  # fmt: skip
        if value:
            header.add_row(label, value if isinstance(value, Text) else Text(str(value)))
    parts: list[RenderableType] = [header]
    if review.class_counts:
        parts.append(Fitting(class_table(evaluation.evaluation, review)))
    if review.confusion_matrix.labels:
        parts.append(Fitting(confusion_table(review.confusion_matrix)))
    if review.samples:
        parts.append(Fitting(samples_table(review.samples)))
    return Group(*parts)


def class_table(evaluation: common_pb2.Evaluation, review: Review) -> Table:
    table = Table(
        "class",
        Column("AP", justify="right"),
        Column("TP", justify="right"),
        Column("FP", justify="right"),
        Column("FN", justify="right"),
        title="per class",
        box=box.SIMPLE_HEAD,
    )
    for counts in review.class_counts:
        table.add_row(
            counts.class_name,
            _number(evaluation.per_class_ap.get(counts.class_name), 3),
            str(counts.true_positives),
            str(counts.false_positives),
            str(counts.false_negatives),
        )
    return table


def confusion_table(matrix: Review.ConfusionMatrix) -> Table:
    """Rows the true class, columns the predicted one, background last in both."""
    labels = list(matrix.labels)
    table = Table(
        Column("true \\ predicted", style="bold"),
        *(Column(label, justify="right") for label in labels),
        title="confusion matrix",
        box=box.SIMPLE_HEAD,
    )
    n = len(labels)
    for i, label in enumerate(labels):
        row = matrix.counts[i * n : (i + 1) * n]
        table.add_row(label, *(str(c) for c in row))
    return table


def samples_table(samples: Sequence[Review.Sample]) -> Table:
    table = Table(
        "rank",
        "image",
        Column("TP", justify="right"),
        Column("FP", justify="right"),
        Column("FN", justify="right"),
        "artifact",
        title="samples",
        box=box.SIMPLE_HEAD,
    )
    for sample in samples:
        table.add_row(
            sample.rank,
            sample.file_name,
            str(sample.true_positives),
            str(sample.false_positives),
            str(sample.false_negatives),
            sample.artifact,
        )
    return table


def comparison_table(comparison: trained_model_pb2.ModelComparison) -> RenderableType:
    """Models as columns, metrics as rows; the best value of each row in bold."""
    table = Table(
        Column("metric", style="bold"),
        *(
            Column(row.display_name or row.trained_model, justify="right")
            for row in comparison.rows
        ),
        title=(
            f"{comparison.split} of {comparison.dataset_fingerprint[:12]}, "
            f"{comparison.image_count} images"
        ),
        box=box.SIMPLE_HEAD,
    )
    for metric in comparison.metrics:
        values = [row.values.get(metric) for row in comparison.rows]
        present = [v for v in values if v is not None and v >= 0]
        best = max(present) if present else None
        table.add_row(
            metric,
            *(
                Text(_number(v, 3), style="bold green" if v is not None and v == best else "")
                for v in values
            ),
        )
    return Fitting(table)
