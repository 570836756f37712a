"""One naming of a run's metrics and one rule for its best epoch (shared.metrics), as the
service's domain applies them."""

from __future__ import annotations

from services.training_runs.domain import TrainingRun
from shared.metrics import LEARNING_RATE, MAP, TOTAL_LOSS, best_epoch, train_metrics
from shared.payloads import Evaluation, Progress, TrainingFacts
from tests.runs import NOW, running


def evaluated(run: TrainingRun, epoch: int, metrics: dict[str, float]) -> None:
    run.report_evaluation(
        Evaluation(epoch=epoch, split="val", metrics=metrics, image_count=5),
        actor="worker:w",
        now=NOW,
    )


def test_the_best_epoch_is_the_highest_map_the_earliest_on_ties() -> None:
    assert best_epoch({1: {MAP: 0.2}, 2: {MAP: 0.5}, 3: {}, 4: {MAP: 0.5}}, last_epoch=4) == 2


def test_without_a_map_the_last_epoch_is_best_and_before_any_none() -> None:
    assert best_epoch({1: {}, 2: {"coco/bbox_mAP_l": -1.0}}, last_epoch=2) == 2
    assert best_epoch({}, last_epoch=0) is None


def test_the_train_entry_has_mmengines_names_and_nothing_else() -> None:
    entry = train_metrics(
        loss=1.5, losses={"loss_cls": 1.0, "loss_bbox": 0.5, "acc": 90.0, "loss": 9.0}, lr=0.01
    )
    assert entry == {"loss_cls": 1.0, "loss_bbox": 0.5, TOTAL_LOSS: 1.5, LEARNING_RATE: 0.01}
    assert train_metrics(loss=None, losses={}, lr=None) == {}


def test_a_live_epoch_has_the_keys_the_workers_series_has() -> None:
    run = running()
    run.report_progress(
        Progress(epoch=1, iteration=3, loss=1.5, losses={"loss_cls": 1.0}, learning_rate=0.01),
        actor="worker:w",
        now=NOW,
    )
    live = run.epoch_metrics[0].train
    # What the training child's ProgressHook makes of the epoch's outputs.
    final = train_metrics(loss=1.2, losses={"loss": 1.2, "loss_cls": 0.8}, lr=0.01)
    assert set(live) == set(final) == {"loss", "loss_cls", "lr"}
    assert live == {"loss": 1.5, "loss_cls": 1.0, "lr": 0.01}


def test_the_domain_follows_the_rule_while_running_and_the_facts_once_finished() -> None:
    run = running()
    assert run.best_epoch is None, "no validation yet"
    evaluated(run, 1, {})
    run.report_progress(Progress(epoch=2, iteration=6, loss=1.0), actor="worker:w", now=NOW)
    # Epoch 2 trains but has no validation yet: the last validated epoch is the best.
    assert run.best_epoch == 1
    evaluated(run, 2, {"coco/bbox_mAP_l": -1.0})
    assert run.best_epoch == 2
    evaluated(run, 3, {MAP: 0.1})
    evaluated(run, 4, {MAP: 0.1})
    assert run.best_epoch == 3

    run.succeed(
        artifacts=[],
        facts=TrainingFacts(best_epoch=3, epochs_trained=4),
        best_evaluation=Evaluation(epoch=3, split="val", metrics={MAP: 0.1}, image_count=5),
        epoch_metrics=[],
        actor="worker:w",
        now=NOW,
    )
    assert run.facts is not None and run.best_evaluation is not None
    assert run.best_epoch == 3 == run.facts.best_epoch == run.best_evaluation.epoch
