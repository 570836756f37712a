"""What `raven runs metrics`, `raven models evaluation(s)` and `raven models compare` print,
rendered from messages shaped as the services send them."""

from __future__ import annotations

from rich.console import Console, RenderableType

from cli.review import (
    comparison_table,
    confusion_table,
    evaluation_details,
    evaluations_table,
    metrics_plot,
    metrics_table,
)
from shared.metrics import MAP, MAP_50
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2, training_run_pb2

Metrics = training_run_pb2.TrainingRunMetrics
Review = common_pb2.DetectionReview


def _text(renderable: RenderableType, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _metrics() -> Metrics:
    metrics = Metrics(training_run="trainingRuns/r", best_epoch=2)
    for epoch, loss, lr, value in (
        (1, 1.5, 0.01, 0.1),
        (2, 0.9, 0.005, 0.42),
        (3, 0.7, 0.001, 0.3),
    ):
        e = metrics.epochs.add(epoch=epoch)
        e.train.update({"loss": loss, "loss_cls": loss / 2, "loss_bbox": loss / 4, "lr": lr})
        e.val.update({MAP: value, MAP_50: value + 0.2})
    return metrics


def test_metrics_table_has_a_row_per_epoch_with_loss_terms_and_marks_the_best() -> None:
    text = _text(metrics_table(_metrics()))
    assert "loss_bbox" in text and "loss_cls" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    best = next(row for row in rows if row[0] == "2")
    assert best[1] == "*" and "0.420" in best and "5.00e-03" in best
    assert "0.9000" in best


def test_metrics_plot_draws_loss_and_map_against_epochs() -> None:
    drawn = metrics_plot(list(_metrics().epochs), width=60, height=14)
    lines = drawn.splitlines()
    assert len(lines) == 14 and all(len(line) <= 60 for line in lines)
    assert "loss" in drawn and "mAP" in drawn and "epoch" in drawn
    assert "\x1b[" not in drawn  # no colour codes unless asked for
    # The right axis spans the mAP values.
    assert "0.420" in drawn and "0.100" in drawn
    other = Metrics()
    other.CopyFrom(_metrics())
    other.epochs[2].val[MAP] = 0.9
    assert metrics_plot(list(other.epochs), width=60, height=14) != drawn


def test_metrics_plot_is_empty_without_loss_or_map() -> None:
    assert metrics_plot([Metrics.EpochMetrics(epoch=1)]) == ""


def _review() -> Review:
    review = Review(score_threshold=0.5, iou_threshold=0.5)
    review.confusion_matrix.labels.extend(["dump", "tyre", "background"])
    # true dump: 5 found, 1 taken for a tyre, 2 missed; tyres: 3 found; 4 false alarms.
    review.confusion_matrix.counts.extend([5, 1, 2, 0, 3, 0, 3, 1, 0])
    review.class_counts.add(
        class_name="dump", true_positives=5, false_positives=3, false_negatives=3
    )
    review.class_counts.add(
        class_name="tyre", true_positives=3, false_positives=2, false_negatives=0
    )
    review.samples.add(rank="worst", image_id=7, file_name="site-7.jpg", false_positives=2,
                       false_negatives=1, artifact="worst-1.png")  # fmt: skip
    return review


def test_confusion_table_puts_true_classes_in_rows_and_background_last() -> None:
    text = _text(confusion_table(_review().confusion_matrix))
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.split() and line.split()[0] in ("dump", "tyre", "background")}  # fmt: skip
    assert rows == {"dump": ["5", "1", "2"], "tyre": ["0", "3", "0"], "background": ["3", "1", "0"]}


def test_evaluation_details_show_metrics_counts_and_samples() -> None:
    evaluation = trained_model_pb2.ModelEvaluation(
        name="trainedModels/m/evaluations/e",
        job="trainingRuns/e",
        state=training_run_pb2.TrainingRun.SUCCEEDED,
        split="test",
        image_count=12,
        dataset_fingerprint="ab" * 32,
        score_threshold=0.4,
        iou_threshold=0.6,
    )
    evaluation.evaluation.metrics[MAP] = 0.512
    evaluation.evaluation.per_class_ap.update({"dump": 0.61, "tyre": 0.41})
    evaluation.review.CopyFrom(_review())
    text = _text(evaluation_details(evaluation))
    assert "test, 12 images" in text and "score 0.4, IoU 0.6" in text and "mAP 0.512" in text
    dump = next(line.split() for line in text.splitlines() if line.split()[:1] == ["dump"]
                and "0.610" in line)  # fmt: skip
    assert dump == ["dump", "0.610", "5", "3", "3"]
    assert "site-7.jpg" in text and "worst-1.png" in text


def test_evaluations_table_lists_each_evaluation() -> None:
    first = trained_model_pb2.ModelEvaluation(name="trainedModels/m/evaluations/e1", split="all")
    first.evaluation.metrics[MAP] = 0.25
    second = trained_model_pb2.ModelEvaluation(name="trainedModels/m/evaluations/e2", split="val")
    text = _text(evaluations_table([first, second]))
    assert "e1" in text and "e2" in text and "0.250" in text and "val" in text


def test_comparison_table_has_a_column_per_model_and_a_row_per_metric() -> None:
    comparison = trained_model_pb2.ModelComparison(
        dataset_fingerprint="cd" * 32, split="test", image_count=20, metrics=[MAP, "AP/dump"]
    )
    comparison.rows.add(trained_model="trainedModels/a", display_name="root").values.update(
        {MAP: 0.31, "AP/dump": 0.2}
    )
    comparison.rows.add(trained_model="trainedModels/b", display_name="tuned").values.update(
        {MAP: 0.47}
    )
    text = _text(comparison_table(comparison))
    assert "root" in text and "tuned" in text and "20 images" in text
    map_row = next(line.split() for line in text.splitlines() if line.split()[:1] == [MAP])
    assert map_row == [MAP, "0.310", "0.470"]
    dump_row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["AP/dump"])
    assert dump_row == ["AP/dump", "0.200", "—"]
