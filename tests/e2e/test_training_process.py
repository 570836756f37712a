"""Real MMDetection training in a child process, on a tiny synthetic dataset (CPU).

Stopping a running child is tested through the whole worker, in test_worker_consumer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import psutil
import pytest

from shared.fields import from_attributes
from tests.configs import TINY_TRAINING
from tests.support import eventually
from trainer_worker import detections
from trainer_worker.architectures import mmdet_configs_root
from trainer_worker.config import BaseCheckpoint, DatasetFiles, TrainingPlan, generate_config
from trainer_worker.dataset import PreparedDataset, prepare_dataset
from trainer_worker.protocol import (
    CheckpointWritten,
    ChildEvent,
    EpochsRestored,
    EpochTrained,
    Evaluated,
    ProgressReported,
    TrainingStarted,
)
from trainer_worker.training import (
    TrainingCancelled,
    TrainingFailed,
    TrainingOutcome,
    TrainingSucceeded,
    place_checkpoint,
    run_training,
)

pytest.importorskip("mmdet")
pytest.importorskip("PIL")
import torch
from mmengine.config import Config

from trainer_worker.synthetic import make_dataset
from trainer_worker.verify import verify

pytestmark = pytest.mark.timeout(240)
CHECKOUT = Path(__file__).resolve().parents[2]


def prepared(
    folder: Path, classes: tuple[str, ...], *, seed: int = 0, test_fraction: float = 0.0
) -> PreparedDataset:
    annotation = make_dataset(folder / "data", images=16, size=128, classes=classes, seed=seed)
    return prepare_dataset(
        annotation_path=annotation,
        image_root=None,
        out_dir=folder / "dataset",
        val_fraction=0.25,
        test_fraction=test_fraction,
        seed=seed,
    )


async def train(
    folder: Path,
    dataset: PreparedDataset,
    *,
    epochs: int,
    base: BaseCheckpoint | None = None,
    resume_from: Path | None = None,
    stop: asyncio.Event | None = None,
    overrides: str = "",
    processes: int = 1,
    env: dict[str, str] | None = None,
    seen: list[ChildEvent] | None = None,
    seed: int = 0,
    deterministic: bool = False,
) -> tuple[TrainingOutcome, list[ChildEvent]]:
    generated = generate_config(
        plan=TrainingPlan(**TINY_TRAINING, epochs=epochs, seed=seed, deterministic=deterministic),
        dataset=from_attributes(DatasetFiles, dataset),
        work_dir=folder / "work",
        configs_root=mmdet_configs_root(),
        base=base,
        resume_from=resume_from,
    )
    config = folder / "config.py"
    config.write_text(generated.text + overrides)
    seen = [] if seen is None else seen

    async def on_event(event: ChildEvent) -> None:
        seen.append(event)
        if isinstance(event, CheckpointWritten):
            # A second name for each epoch's full checkpoint, which training removes when
            # it succeeds: what a later attempt of an unfinished run resumes from.
            (folder / "kept").mkdir(exist_ok=True)
            os.link(event.path, folder / "kept" / Path(event.path).name)

    outcome = await run_training(
        config_path=config,
        work_dir=folder / "work",
        artifact_dir=folder / "model",
        split_path=dataset.split_path,
        log_path=folder / "train.log",
        on_event=on_event,
        stop=stop,
        env={"CUDA_VISIBLE_DEVICES": ""} if env is None else env,
        processes=processes,
    )
    return outcome, seen


@pytest.fixture(scope="module")
async def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingOutcome, list]:
    folder = tmp_path_factory.mktemp("root")
    outcome, seen = await train(folder, prepared(folder, ("dump", "tire")), epochs=2)
    return folder, outcome, seen


async def test_training_reports_and_produces_verified_artifacts(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
) -> None:
    folder, outcome, seen = trained
    assert isinstance(outcome, TrainingSucceeded), outcome

    started = [e for e in seen if isinstance(e, TrainingStarted)]
    assert len(started) == 1 and started[0].device == "cpu"
    assert started[0].parameter_count > 1_000_000
    progress = [e for e in seen if isinstance(e, ProgressReported)]
    iters = [p.iter for p in progress]
    assert iters == sorted(iters) and iters[-1] == progress[-1].max_iters
    assert {p.epoch for p in progress} == {1, 2}
    assert all(p.loss is not None and p.loss > 0 for p in progress)
    assert all("loss_cls" in p.losses and "loss_bbox" in p.losses for p in progress)
    assert progress[-1].eta_s == 0
    assert [e.epoch for e in seen if isinstance(e, EpochTrained)] == [1, 2]
    evaluations = [e for e in seen if isinstance(e, Evaluated)]
    assert [e.epoch for e in evaluations] == [1, 2]

    assert outcome.epochs_trained == 2
    assert outcome.best_epoch in (1, 2)
    assert outcome.best_metrics == evaluations[outcome.best_epoch - 1].metrics
    if not any("coco/bbox_mAP" in e.metrics for e in evaluations):
        # No detections yet: no mAP is a value, and the last epoch is the best.
        assert outcome.best_epoch == 2
    assert [r.epoch for r in outcome.epochs] == [1, 2]
    assert all("loss" in r.train for r in outcome.epochs)

    kinds = {a.kind: a for a in outcome.artifacts}
    assert set(kinds) == {"config", "checkpoint", "metrics", "split", "log"}
    assert "Epoch(train)" in kinds["log"].path.read_text()
    for artifact in outcome.artifacts:
        data = artifact.path.read_bytes()
        assert artifact.path.parent == folder / "model"
        assert artifact.size_bytes == len(data)
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    metrics = json.loads(kinds["metrics"].path.read_text())
    assert metrics["best_epoch"] == outcome.best_epoch
    # The resolved config stands alone: no `_base_` into the mmdet wheel.
    assert "\n_base_ = " not in "\n" + kinds["config"].path.read_text()
    # Only the artifact keeps a checkpoint, and of the training state only the weights.
    assert not list((folder / "work").glob("epoch_*.pth"))
    kept = torch.load(kinds["checkpoint"].path, map_location="cpu", weights_only=True)
    assert set(kept) == {"state_dict", "meta"}
    full = folder / "kept" / f"epoch_{outcome.best_epoch}.pth"
    assert kinds["checkpoint"].size_bytes < full.stat().st_size * 0.6
    assert verify(str(kinds["config"].path), str(kinds["checkpoint"].path))["ok"]
    # The detections of the kept and the latest epoch's validations stay, for the report,
    # in COCO results format, of the val split's images.
    work = folder / "work"
    assert detections.kept_epochs(work, "val") == {outcome.best_epoch, 2}
    assert not detections.dumped(work, "val").exists(), "renamed after its epoch"
    val_split = folder / "dataset" / "val.json"
    val_ids = {i["id"] for i in json.loads(val_split.read_text())["images"]}
    for epoch in (outcome.best_epoch, 2):
        found = json.loads(detections.of_epoch(work, "val", epoch).read_text())
        assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in found)
        assert {d["image_id"] for d in found} <= val_ids


def test_progress_carries_mmengine_timings_the_worker_metrics_add_up(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
) -> None:
    from prometheus_client import generate_latest

    from trainer_worker.metrics import WorkerMetrics

    _, _, seen = trained
    progress = [e for e in seen if isinstance(e, ProgressReported)]
    # Every iteration is in exactly one report's window, with mmengine's time and data_time.
    assert sum(p.window_iters for p in progress) == progress[-1].max_iters
    assert all(p.iter_time_s and p.iter_time_s > 0 for p in progress)
    assert all(p.data_time_s is not None and 0 <= p.data_time_s <= p.iter_time_s for p in progress)
    assert all(p.window_images >= p.window_iters for p in progress)
    epochs = [e for e in seen if isinstance(e, EpochTrained)]
    assert all(e.duration_s and e.duration_s > 0 for e in epochs)

    metrics = WorkerMetrics()
    with metrics.job("run"):
        for event in seen:
            metrics.child_event("run", event)
        body = generate_latest(metrics.registry).decode()
    total = progress[-1].max_iters
    assert f"raven_worker_iterations_total {float(total)}" in body
    assert "raven_worker_epoch_seconds_count 2.0" in body


def reported_order(seen: list[ChildEvent]) -> list[tuple[str, int]]:
    return [
        ("checkpoint" if isinstance(e, CheckpointWritten) else "validation", e.epoch)
        for e in seen
        if isinstance(e, CheckpointWritten) or (isinstance(e, Evaluated) and e.split == "val")
    ]


async def test_each_checkpoint_is_reported_after_its_epochs_validation(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
) -> None:
    """A reported checkpoint is where a later attempt resumes, after its epoch: reported
    before the epoch's validation, a worker lost in between leaves the epoch unvalidated."""
    _, _, seen = trained
    assert reported_order(seen) == [
        ("validation", 1),
        ("checkpoint", 1),
        ("validation", 2),
        ("checkpoint", 2),
    ]


async def test_an_epoch_without_validation_reports_its_checkpoint_as_the_next_starts(
    tmp_path: Path,
) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))

    outcome, seen = await train(
        tmp_path,
        dataset,
        epochs=2,
        overrides=(
            '\ntrain_cfg = dict(_delete_=True, type="EpochBasedTrainLoop", max_epochs=2,'
            " val_interval=2)\n"
        ),
    )

    assert isinstance(outcome, TrainingSucceeded), outcome
    assert reported_order(seen) == [("checkpoint", 1), ("validation", 2), ("checkpoint", 2)]
    trained_epochs = [i for i, e in enumerate(seen) if isinstance(e, EpochTrained)]
    first_checkpoint = next(i for i, e in enumerate(seen) if isinstance(e, CheckpointWritten))
    # Epoch 1 had no validation: its checkpoint goes out before epoch 2 ends, not with it.
    assert trained_epochs[0] < first_checkpoint < trained_epochs[1]


async def test_fine_tune_with_new_classes_loads_the_checkpoint(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
    tmp_path: Path,
) -> None:
    _, root, _ = trained
    assert isinstance(root, TrainingSucceeded)
    checkpoint = next(a.path for a in root.artifacts if a.kind == "checkpoint")
    dataset = prepared(tmp_path, ("dump", "tire", "bottle"), seed=1)

    outcome, seen = await train(
        tmp_path,
        dataset,
        epochs=1,
        base=BaseCheckpoint(
            path=checkpoint, architecture="retinanet_r18_fpn", classes=("dump", "tire")
        ),
    )

    assert isinstance(outcome, TrainingSucceeded), outcome
    assert [e.epoch for e in seen if isinstance(e, Evaluated)] == [1]
    log = (tmp_path / "train.log").read_text()
    stripped = tmp_path / "work" / "base_model.pth"
    assert f"Load checkpoint from {stripped}" in log
    # Only the class-dependent weights start fresh; the rest came from the base model.
    assert "bbox_head.retina_cls.weight" in log
    assert "backbone.conv1.weight" not in log


async def test_resume_continues_after_the_checkpoint_epoch(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
    tmp_path: Path,
) -> None:
    root_folder, root, _ = trained
    assert isinstance(root, TrainingSucceeded)
    checkpoint = root_folder / "kept" / f"epoch_{root.best_epoch}.pth"
    dataset = prepared(root_folder / "again", ("dump", "tire"))

    outcome, seen = await train(
        tmp_path, dataset, epochs=root.best_epoch + 1, resume_from=checkpoint
    )

    assert isinstance(outcome, TrainingSucceeded), outcome
    # Only the epoch after the checkpoint's is trained and evaluated.
    assert [e.epoch for e in seen if isinstance(e, EpochTrained)] == [root.best_epoch + 1]
    assert [e.epoch for e in seen if isinstance(e, Evaluated)] == [root.best_epoch + 1]
    written = [e for e in seen if isinstance(e, CheckpointWritten)]
    assert [e.epoch for e in written] == [root.best_epoch + 1]
    log = (tmp_path / "train.log").read_text()
    assert f"resumed epoch: {root.best_epoch}," in log
    # The checkpoint carried the series of the epochs before it: the outcome has them all.
    (restored,) = [e for e in seen if isinstance(e, EpochsRestored)]
    assert [e["epoch"] for e in restored.epochs] == list(range(1, root.best_epoch + 1))
    assert [r.epoch for r in outcome.epochs] == list(range(1, root.best_epoch + 2))
    assert all("loss" in r.train for r in outcome.epochs)
    assert outcome.epochs_trained == root.best_epoch + 1


def with_best_first_epoch(source: Path, target: Path) -> Path:
    """A copy of an epoch 2 checkpoint whose series says epoch 1 scored the highest mAP
    (an untrained model on a tiny dataset scores next to nothing, if anything)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    for entry in checkpoint["raven_epochs"]:
        if entry["epoch"] == 1:
            entry["val"] = {**entry["val"], "coco/bbox_mAP": 1.0}
    torch.save(checkpoint, target)
    return target


def same_weights(model: Path, checkpoint: Path) -> bool:
    kept = torch.load(model, map_location="cpu", weights_only=True)["state_dict"]
    full = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return set(kept) == set(full) and all(torch.equal(kept[k], full[k]) for k in kept)


@pytest.mark.parametrize("placed", [True, False], ids=["placed", "unavailable"])
async def test_a_resumed_run_keeps_an_earlier_attempts_best_epoch(
    trained: tuple[Path, TrainingOutcome, list[ChildEvent]],
    tmp_path: Path,
    placed: bool,
) -> None:
    root_folder, root, _ = trained
    assert isinstance(root, TrainingSucceeded)
    resume_from = with_best_first_epoch(root_folder / "kept" / "epoch_2.pth", tmp_path / "e2.pth")
    # What the worker does with a claim's checkpoints before training resumes.
    place_checkpoint(resume_from, tmp_path / "work", epoch=2)
    if placed:
        place_checkpoint(root_folder / "kept" / "epoch_1.pth", tmp_path / "work", epoch=1)
    dataset = prepared(tmp_path, ("dump", "tire"), test_fraction=0.25)

    outcome, seen = await train(tmp_path, dataset, epochs=3, resume_from=resume_from)

    assert isinstance(outcome, TrainingSucceeded), outcome
    assert [e.epoch for e in seen if isinstance(e, EpochTrained)] == [3]
    model = next(a.path for a in outcome.artifacts if a.kind == "checkpoint")
    (tested,) = [e for e in seen if isinstance(e, Evaluated) and e.split == "test"]
    assert not list((tmp_path / "work").glob("epoch_*.pth"))
    # The test split's detections are the tested weights'.
    assert detections.kept_epochs(tmp_path / "work", "test") == {tested.epoch}
    if not placed:
        # Without epoch 1's checkpoint, the best is chosen as before, among the others.
        assert outcome.best_epoch in (2, 3)
        assert tested.epoch == outcome.best_epoch
        return
    assert outcome.best_epoch == 1
    assert outcome.best_metrics["coco/bbox_mAP"] == 1.0
    # The model and its test evaluation are epoch 1's, which the earlier attempt trained.
    assert same_weights(model, root_folder / "kept" / "epoch_1.pth")
    assert tested.epoch == 1
    assert outcome.test_evaluation is not None and outcome.test_evaluation.epoch == 1
    # Epoch 1 was validated by the earlier attempt: this one's val detections are epoch 3's.
    assert detections.kept_epochs(tmp_path / "work", "val") == {3}
    metrics = json.loads(next(a.path for a in outcome.artifacts if a.kind == "metrics").read_text())
    assert metrics["best_epoch"] == 1 and metrics["test"]["epoch"] == 1
    # The files placed were links: the earlier attempt's checkpoints are still there.
    assert (root_folder / "kept" / "epoch_1.pth").is_file()


async def test_a_nan_loss_fails_the_run_as_diverged(tmp_path: Path) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))
    # Merged into the generated config's model: the classification loss is weighted by NaN.
    nan_loss = '\nmodel["bbox_head"]["loss_cls"] = dict(loss_weight=float("nan"))\n'

    outcome, seen = await train(tmp_path, dataset, epochs=1, overrides=nan_loss)

    assert isinstance(outcome, TrainingFailed), outcome
    assert outcome.reason == "diverged"
    assert "is nan at epoch 1, iteration 1" in outcome.message
    assert not [e for e in seen if isinstance(e, EpochTrained)], "stopped at once"


async def test_a_crashing_child_fails_with_the_log_tail(tmp_path: Path) -> None:
    config = tmp_path / "config.py"
    config.write_text("raise RuntimeError('this config is broken on purpose')\n")

    async def ignore(event: ChildEvent) -> None:
        pass

    outcome = await run_training(
        config_path=config,
        work_dir=tmp_path / "work",
        artifact_dir=tmp_path / "model",
        split_path=tmp_path / "split.json",
        log_path=tmp_path / "train.log",
        on_event=ignore,
    )
    assert isinstance(outcome, TrainingFailed)
    assert outcome.reason == "training_crashed"
    assert outcome.message.startswith("RuntimeError: this config is broken on purpose")


async def test_a_crash_in_training_reads_exception_first_without_our_paths(
    tmp_path: Path,
) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))
    # The optimizer is built after mmengine has logged its banners and hook table.
    bad_optimizer = '\noptim_wrapper["optimizer"]["bogus_option"] = 1\n'

    outcome, _ = await train(tmp_path, dataset, epochs=1, overrides=bad_optimizer)

    assert isinstance(outcome, TrainingFailed), outcome
    assert outcome.reason == "training_crashed"
    first_line = outcome.message.splitlines()[0]
    assert first_line.startswith("TypeError: "), outcome.message
    assert "bogus_option" in first_line
    assert "Traceback, last frames" in outcome.message
    assert "`log` artifact" in outcome.message
    assert len(outcome.message) <= 2000
    for ours in (str(tmp_path), str(CHECKOUT), "site-packages/"):
        assert ours not in outcome.message
    # The whole log, hook table included, stays in the log file.
    log_text = await asyncio.to_thread((tmp_path / "train.log").read_text)
    assert "bogus_option" in log_text


# Two ranks under torch's distributed launcher: over gloo on CPU wherever the tests run,
# over NCCL where there are two GPUs.
DEVICES = [
    pytest.param({"CUDA_VISIBLE_DEVICES": ""}, id="cpu"),
    pytest.param({}, id="cuda", marks=pytest.mark.gpu(2)),
]


@pytest.mark.parametrize("env", DEVICES)
async def test_two_ranks_train_one_run_and_rank_zero_alone_reports(
    env: dict[str, str], tmp_path: Path
) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))

    outcome, seen = await train(tmp_path, dataset, epochs=2, processes=2, env=env)

    assert isinstance(outcome, TrainingSucceeded), outcome
    # One reporter: a second rank's events would repeat every epoch.
    assert len([e for e in seen if isinstance(e, TrainingStarted)]) == 1
    assert [e.epoch for e in seen if isinstance(e, EpochTrained)] == [1, 2]
    assert [e.epoch for e in seen if isinstance(e, Evaluated)] == [1, 2]
    assert [e.epoch for e in seen if isinstance(e, CheckpointWritten)] == [1, 2]
    progress = [e for e in seen if isinstance(e, ProgressReported)]
    # 12 training images, a total batch of 4: 3 iterations an epoch, as on one process.
    assert progress[-1].iter == progress[-1].max_iters == 6
    log = (tmp_path / "train.log").read_text()
    assert "Distributed training: True" in log and "GPU number: 2" in log
    config = Config.fromfile(next(a.path for a in outcome.artifacts if a.kind == "config"))
    assert config.launcher == "pytorch"
    # The batch of 4 is the run's total: 2 on each rank.
    assert config.train_dataloader.batch_size == 2
    assert not list((tmp_path / "work").glob("epoch_*.pth"))
    # Rank 0 dumped and renamed the validations' detections, each once.
    assert detections.kept_epochs(tmp_path / "work", "val") == {outcome.best_epoch, 2}


def launched(tmp_path: Path) -> list[psutil.Process]:
    """The processes running this test's config: the launcher and its ranks."""
    config = str(tmp_path / "config.py")
    return [p for p in psutil.process_iter(["cmdline"]) if config in (p.info["cmdline"] or [])]


async def test_stopping_a_launched_run_stops_every_rank(tmp_path: Path) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))
    stop = asyncio.Event()
    seen: list[ChildEvent] = []
    training = asyncio.create_task(
        train(tmp_path, dataset, epochs=50, processes=2, stop=stop, seen=seen)
    )

    async def progressing() -> bool:
        return any(isinstance(e, ProgressReported) for e in seen)

    await eventually(progressing, timeout=120)
    assert len(launched(tmp_path)) == 3, "the launcher and its two ranks"
    stopped_at = time.monotonic()
    stop.set()
    outcome, _ = await training

    assert isinstance(outcome, TrainingCancelled), outcome
    # Every rank stopped on the launcher's SIGTERM, well before the worker's SIGKILL.
    assert time.monotonic() - stopped_at < 30
    assert not launched(tmp_path)


async def test_a_diverged_rank_fails_a_launched_run_as_diverged(tmp_path: Path) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"))
    nan_loss = '\nmodel["bbox_head"]["loss_cls"] = dict(loss_weight=float("nan"))\n'

    outcome, _ = await train(tmp_path, dataset, epochs=1, overrides=nan_loss, processes=2)

    # The launcher exits 1 whatever its ranks' statuses: rank 0's event says why.
    assert isinstance(outcome, TrainingFailed), outcome
    assert outcome.reason == "diverged"
    assert "is nan at epoch 1, iteration 1" in outcome.message


@pytest.mark.timeout(480)
async def test_a_deterministic_run_repeats_its_losses_epoch_by_epoch(tmp_path: Path) -> None:
    dataset = prepared(tmp_path, ("dump", "tire"), seed=2)
    repeats = []
    for attempt in ("first", "second"):
        folder = tmp_path / attempt
        folder.mkdir()
        outcome, seen = await train(folder, dataset, epochs=2, seed=5, deterministic=True)
        assert isinstance(outcome, TrainingSucceeded), outcome
        assert "deterministic: True" in (folder / "train.log").read_text()
        repeats.append(
            (
                [dict(e.losses) for e in seen if isinstance(e, EpochTrained)],
                [dict(e.metrics) for e in seen if isinstance(e, Evaluated)],
            )
        )
    (first_losses, first_val), (second_losses, second_val) = repeats
    assert len(first_losses) == 2 and all("loss_cls" in e for e in first_losses)
    # Bit for bit: the same shuffling, augmentation, initialisation and arithmetic.
    assert first_losses == second_losses
    assert first_val == second_val
