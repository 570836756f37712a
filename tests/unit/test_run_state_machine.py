"""The TrainingRun state machine: every transition, legal or not."""

from __future__ import annotations

import pytest

from services.training_runs.domain import EventKind, RunState, TrainingRun
from shared.errors import FailedPrecondition
from shared.payloads import Artifact, Evaluation, Progress, TrainingFacts
from tests.runs import NOW, queued, running


def states(run: TrainingRun) -> list[str]:
    return [
        e.state_change.to_state
        for e in run.new_events
        if e.kind is EventKind.STATE_CHANGED and e.state_change
    ]


def succeed_with_nothing(run: TrainingRun) -> None:
    run.succeed(
        artifacts=[],
        facts=TrainingFacts(),
        best_evaluation=None,
        epoch_metrics=[],
        actor="a",
        now=NOW,
    )


def test_a_run_goes_through_its_lifecycle_with_a_gapless_history():
    run = running()
    run.report_progress(Progress(iteration=1), actor="worker:w", now=NOW)
    run.succeed(
        artifacts=[Artifact(kind="checkpoint")],
        facts=TrainingFacts(best_epoch=1),
        best_evaluation=None,
        epoch_metrics=[],
        actor="worker:w",
        now=NOW,
    )
    assert run.state is RunState.SUCCEEDED and run.end_time == NOW
    assert states(run) == ["QUEUED", "PREPARING", "RUNNING", "SUCCEEDED"]
    assert [e.sequence for e in run.new_events] == list(range(1, 6))
    assert run.new_events[-1].is_terminal


@pytest.mark.parametrize(
    "act",
    [
        lambda r: r.start_running(device="cpu", actor="a", now=NOW),
        succeed_with_nothing,
        lambda r: r.cancelled(actor="a", now=NOW),
        lambda r: r.report_progress(Progress(iteration=1), actor="a", now=NOW),
    ],
)
def test_illegal_transitions_from_queued_leave_the_run_unchanged(act):
    run = queued()
    before = (run.state, run.version, len(run.new_events))
    with pytest.raises(FailedPrecondition):
        act(run)
    assert (run.state, run.version, len(run.new_events)) == before


def test_nothing_changes_a_finished_run():
    run = running()
    run.fail(reason="training_crashed", message="exit code 1", actor="worker:w", now=NOW)
    for act in (
        lambda: run.start_preparing(worker_id="w2", actor="w", now=NOW),
        lambda: run.request_cancel(reason="", actor="u", now=NOW),
        lambda: succeed_with_nothing(run),
    ):
        with pytest.raises(FailedPrecondition):
            act()
    assert run.state is RunState.FAILED
    assert run.failure is not None and run.failure.reason == "training_crashed"


def test_cancelling_a_queued_run_ends_it_at_once_and_twice_is_harmless():
    run = queued()
    run.request_cancel(reason="", actor="user", now=NOW)
    assert run.state is RunState.CANCELLED
    events = len(run.new_events)
    run.request_cancel(reason="", actor="user", now=NOW)
    assert len(run.new_events) == events


def test_cancelling_an_active_run_waits_for_the_worker():
    run = running()
    run.request_cancel(reason="wrong data", actor="user", now=NOW)
    assert run.state is RunState.CANCELLING
    run.report_progress(Progress(iteration=5), actor="worker:w", now=NOW)  # still reporting
    run.cancelled(actor="worker:w", now=NOW)
    assert run.state is RunState.CANCELLED
    assert states(run)[-2:] == ["CANCELLING", "CANCELLED"]


def test_progress_that_is_not_newer_is_ignored():
    run = running()
    assert run.report_progress(Progress(iteration=3), actor="w", now=NOW)
    assert not run.report_progress(Progress(iteration=3), actor="w", now=NOW)
    assert not run.report_progress(Progress(iteration=2), actor="w", now=NOW)
    assert run.progress == Progress(iteration=3)


def test_active_runs_cannot_be_deleted():
    run = running()
    with pytest.raises(FailedPrecondition, match="cancel it"):
        run.ensure_deletable()
    run.fail(reason="x", message="y", actor="w", now=NOW)
    run.ensure_deletable()


def test_a_takeover_gets_the_newest_and_the_best_epochs_checkpoints():
    run = running()

    def epoch(number: int, mAP: float) -> None:
        # A checkpoint is stored before its epoch's evaluation arrives.
        run.record_checkpoint(Artifact(uri=f"file:///epoch_{number}.pth"), epoch=number, now=NOW)
        evaluation = Evaluation(epoch=number, metrics={"coco/bbox_mAP": mAP})
        run.report_evaluation(evaluation, actor="worker:w", now=NOW)

    epoch(1, 0.2)
    epoch(2, 0.5)
    epoch(3, 0.5)  # a tie: the earlier epoch stays the best
    run.record_checkpoint(Artifact(uri="file:///epoch_4.pth"), epoch=4, now=NOW)

    # Only the best and the newest stay recorded, as the worker keeps only their files.
    assert sorted(a.epoch or 0 for a in run.artifacts) == [2, 4]
    claim = run.claim(attempt=1, worker_id="w2", max_attempts=3, now=NOW)
    assert claim.granted and claim.attempt == 2
    assert claim.resume_from is not None and claim.resume_from.epoch == 4
    assert claim.best_checkpoint is not None
    assert claim.best_checkpoint.uri == "file:///epoch_2.pth"

    run.report_evaluation(
        Evaluation(epoch=4, metrics={"coco/bbox_mAP": 0.7}), actor="worker:w2", now=NOW
    )
    assert [a.epoch for a in run.artifacts] == [4]
    # The newest is the best: it is sent once, as the checkpoint to resume from.
    assert run.best_checkpoint is None and run.resume_checkpoint is not None


def test_without_a_mAP_only_the_newest_checkpoint_is_kept():
    run = running()
    for number in (1, 2):
        run.record_checkpoint(Artifact(uri=f"file:///epoch_{number}.pth"), epoch=number, now=NOW)
        run.report_evaluation(Evaluation(epoch=number), actor="worker:w", now=NOW)
    assert [a.epoch for a in run.artifacts] == [2]
    claim = run.claim(attempt=1, worker_id="w2", max_attempts=3, now=NOW)
    assert claim.best_checkpoint is None
    assert claim.resume_from is not None and claim.resume_from.epoch == 2
