"""The live line of `raven runs watch`: ETA, loss parts, learning rate and images per second."""

from __future__ import annotations

import pytest

from cli.live import Throughput, images_per_iteration, progress_fields
from shared.proto.raven.training.v1 import training_run_pb2

Progress = training_run_pb2.Progress
Spec = training_run_pb2.TrainingSpec


def test_the_fields_of_a_progress_report() -> None:
    progress = Progress(
        epoch=2, max_epochs=6, iteration=40, max_iterations=120, loss=0.8123, learning_rate=0.004
    )
    progress.losses.update({"loss": 0.8123, "loss_cls": 0.5, "loss_bbox": 0.3123})
    progress.eta.FromSeconds(3725)
    fields = progress_fields(progress, 12.34)
    assert fields == {
        "epoch": "2/6",
        "eta": "1:02:05",
        "loss": "0.8123",
        "parts": "bbox 0.312 cls 0.500",
        "lr": "4.00e-03",
        "speed": "12.3 img/s",
    }
    progress.eta.FromSeconds(75)
    assert progress_fields(progress, None)["eta"] == "1:15"
    assert progress_fields(Progress(), None) == {
        "epoch": "—", "eta": "—", "loss": "—", "parts": "", "lr": "—", "speed": "—",
    }  # fmt: skip


def test_images_per_second_come_from_iterations_between_reports() -> None:
    speed = Throughput(images_per_iteration(Spec(batch_size=4)))
    assert speed.update(at=100.0, iteration=10) is None
    assert speed.update(at=102.0, iteration=20) == pytest.approx(20.0)  # 10 its x 4 / 2 s
    # Smoothed: a slower stretch moves it part of the way.
    slower = speed.update(at=106.0, iteration=30)
    assert slower is not None and 10.0 < slower < 20.0
    # A new attempt resumed at an earlier iteration: measured afresh.
    assert speed.update(at=107.0, iteration=5) is None
    assert speed.update(at=108.0, iteration=9) == pytest.approx(16.0)


def test_a_run_over_several_gpus_splits_its_batch() -> None:
    assert images_per_iteration(Spec(batch_size=8, device=Spec.GPU, gpu_count=4)) == 8
    assert images_per_iteration(Spec()) == 1
