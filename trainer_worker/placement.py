"""Where a run trains: how many of the worker's GPUs it leases (or the CPU), how its data
loads there, and what a person should know when the spec is not met as asked."""

from __future__ import annotations

import os
from dataclasses import dataclass

from shared.proto.raven.training.v1 import training_run_pb2
from trainer_worker.devices import CUDA_VISIBLE_DEVICES, DataLoading, data_loading, per_device_batch
from trainer_worker.job import WorkerEnvironment

Device = training_run_pb2.TrainingSpec.Device


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    # GPUs to lease (None: on CPU; 0: on whatever device the child finds).
    gpus: int | None
    loading: DataLoading
    # (code, message) notices about the devices, to publish before training.
    notices: tuple[tuple[str, str], ...]


def place(
    spec: training_run_pb2.TrainingSpec, environment: WorkerEnvironment, *, batch_size: int
) -> Placement:
    """The devices and data loading of a run of `batch_size` images per iteration."""
    wanted, device_notice = gpus_wanted(spec, environment)
    notices: list[tuple[str, str]] = []
    if device_notice:
        notices.append(("device", device_notice))
    if wanted and batch_size % wanted:
        per_gpu = per_device_batch(batch_size, wanted)
        notices.append(
            (
                "batch_size",
                f"batch size {batch_size} over {wanted} GPUs: {per_gpu} per GPU, "
                f"{per_gpu * wanted} per iteration",
            )
        )
    return Placement(
        gpus=wanted, loading=run_data_loading(wanted, environment), notices=tuple(notices)
    )


def gpus_wanted(
    spec: training_run_pb2.TrainingSpec, environment: WorkerEnvironment
) -> tuple[int | None, str]:
    """How many of the worker's GPUs the run trains on (None: on CPU; 0: on whatever device
    the child finds), and a notice when the spec is not met.

    A run asking for more GPUs than the worker has trains on all it has, with the same
    total batch: a smaller worker is slower, not a failure.
    """
    if environment.device == "cpu" or spec.device == Device.CPU:
        return None, "this worker trains on CPU only" if spec.device == Device.GPU else ""
    asked = spec.gpu_count if spec.HasField("gpu_count") and spec.gpu_count > 1 else 1
    have = len(environment.gpus.devices)
    if have == 0:
        return 0, f"{asked} GPUs requested: this worker trains on one device" if asked > 1 else ""
    if asked > have:
        return have, f"{asked} GPUs requested, this worker has {have}: it trains on {have}"
    return asked, ""


def run_data_loading(wanted: int | None, environment: WorkerEnvironment) -> DataLoading:
    """The data loading of a run on `wanted` GPUs (gpus_wanted: None or 0, no GPU known)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return data_loading(
        environment.dataloader_workers,
        run_gpus=wanted or 0,
        worker_gpus=len(environment.gpus.devices),
        cpu_count=cpus,
    )


def device_env(leased: tuple[str, ...], *, cpu: bool) -> dict[str, str]:
    """Environment that pins the child to its leased GPUs, or to the CPU."""
    if cpu:
        return {CUDA_VISIBLE_DEVICES: ""}
    return {CUDA_VISIBLE_DEVICES: ",".join(leased)} if leased else {}
