"""The data loading a worker gives a run: its setting, else a default per device."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import Settings
from trainer_worker.devices import CPU_LOADER_WORKERS, DataLoading, GpuPool, data_loading
from trainer_worker.job import WorkerEnvironment
from trainer_worker.placement import run_data_loading


@pytest.mark.parametrize(
    ("run_gpus", "worker_gpus", "cpus", "workers"),
    [
        (1, 1, 16, 4),  # four per GPU
        (2, 2, 16, 4),  # per rank: each rank has its own loaders
        (1, 8, 16, 2),  # jobs on the other GPUs load too: each GPU's share of the cores
        (1, 1, 2, 2),  # never more than the cores
        (1, 4, 2, 1),  # at least one
    ],
)
def test_on_cuda_a_few_pinned_persistent_workers_per_gpu(
    run_gpus: int, worker_gpus: int, cpus: int, workers: int
) -> None:
    loading = data_loading(None, run_gpus=run_gpus, worker_gpus=worker_gpus, cpu_count=cpus)
    assert loading == DataLoading(workers=workers, persistent_workers=True, pin_memory=True)


def test_on_cpu_nothing_is_pinned() -> None:
    loading = data_loading(None, run_gpus=0, worker_gpus=0, cpu_count=16)
    assert loading.workers == CPU_LOADER_WORKERS and loading.pin_memory is False
    assert loading.persistent_workers is (CPU_LOADER_WORKERS > 0)


def test_the_setting_wins_on_any_device() -> None:
    assert data_loading(0, run_gpus=1, worker_gpus=1, cpu_count=16) == DataLoading(
        workers=0, persistent_workers=False, pin_memory=True
    )
    assert data_loading(3, run_gpus=0, worker_gpus=0, cpu_count=16) == DataLoading(
        workers=3, persistent_workers=True, pin_memory=False
    )


def test_the_worker_setting_reaches_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAVEN_WORKER_DATALOADER_WORKERS", "3")
    assert Settings().worker_dataloader_workers == 3
    monkeypatch.delenv("RAVEN_WORKER_DATALOADER_WORKERS")
    assert Settings().worker_dataloader_workers is None
    environment = WorkerEnvironment(artifact_root=Path("/nonexistent"), dataloader_workers=3)
    assert run_data_loading(None, environment).workers == 3
    gpus = WorkerEnvironment(artifact_root=Path("/nonexistent"), gpus=GpuPool(("0", "1")))
    assert run_data_loading(1, gpus).pin_memory is True
