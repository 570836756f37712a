"""The worker's GPUs, found without torch, and leased to jobs so that two never share a card.

The worker process never imports torch (it takes seconds and a CUDA context): it learns its
GPUs from `CUDA_VISIBLE_DEVICES` when that is set, else from `nvidia-smi -L`, and hands each
job its own subset as the child's `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# Loader processes per GPU when the worker's setting leaves it open: mmdet's own configs
# use 2 to 4, so that decoding and augmenting images keeps up with the GPU.
LOADER_WORKERS_PER_GPU = 4
# On CPU the loader processes compete with training for the same cores
# (docs/training.md, "Data loading", has the measurement).
CPU_LOADER_WORKERS = 0
_NVIDIA_SMI_TIMEOUT_S = 20.0
# "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5c1f...)" and, under a GPU split into MIG
# instances, "  MIG 1g.10gb     Device  0: (UUID: MIG-8c3a...)".
_GPU_LINE = re.compile(r"^GPU \d+: .*\(UUID: (GPU-[^)\s]+)\)\s*$")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)\s*$")


def visible_gpus(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The CUDA devices this worker may hand out, as `CUDA_VISIBLE_DEVICES` entries.

    A `CUDA_VISIBLE_DEVICES` the worker was started with is the whole truth (empty: none).
    Otherwise `nvidia-smi -L` lists them by UUID, which, unlike an index, names the same
    card in nvidia-smi's order and in CUDA's. No nvidia-smi: none found.
    """
    if CUDA_VISIBLE_DEVICES in environ:
        return parse_cuda_visible_devices(environ[CUDA_VISIBLE_DEVICES])
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"],
            env=dict(environ),
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi_list(listed.stdout)


def parse_cuda_visible_devices(value: str) -> tuple[str, ...]:
    """Entries of a `CUDA_VISIBLE_DEVICES` value; CUDA ignores everything after an invalid
    one, so "-1" (or "") means no device."""
    devices: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return tuple(devices)


def parse_nvidia_smi_list(text: str) -> tuple[str, ...]:
    """The UUIDs in `nvidia-smi -L` output: a GPU's own, or its MIG instances' where it is
    split (CUDA then sees only the instances)."""
    gpus: list[list[str]] = []
    for line in text.splitlines():
        if match := _GPU_LINE.match(line):
            gpus.append([match.group(1)])
        elif (match := _MIG_LINE.match(line)) and gpus:
            if gpus[-1][0].startswith("GPU-"):
                gpus[-1] = []
            gpus[-1].append(match.group(1))
    return tuple(uuid for gpu in gpus for uuid in gpu)


def worker_concurrency(configured: int | None, gpus: int) -> int:
    """Jobs a worker trains at once: as configured, else one per GPU, or one without GPUs."""
    return configured if configured is not None else max(1, gpus)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataLoading:
    """How a run's dataloaders load: processes per dataloader (per rank), whether they
    outlive an epoch, whether batches go to pinned memory for faster copies to the GPU."""

    workers: int
    persistent_workers: bool
    pin_memory: bool


def data_loading(
    configured: int | None, *, run_gpus: int, worker_gpus: int, cpu_count: int
) -> DataLoading:
    """The data loading of a run on `run_gpus` GPUs (0: on CPU) of a worker with
    `worker_gpus` and `cpu_count` cores. `configured` (RAVEN_WORKER_DATALOADER_WORKERS)
    wins; unset: LOADER_WORKERS_PER_GPU per GPU, no more than each of the worker's GPUs'
    share of the cores (jobs on its other GPUs load too), and CPU_LOADER_WORKERS on CPU."""
    if configured is not None:
        workers = configured
    elif run_gpus > 0:
        share = max(1, cpu_count // max(1, worker_gpus, run_gpus))
        workers = min(LOADER_WORKERS_PER_GPU, share)
    else:
        workers = CPU_LOADER_WORKERS
    return DataLoading(workers=workers, persistent_workers=workers > 0, pin_memory=run_gpus > 0)


def per_device_batch(total: int, devices: int) -> int:
    """Images per GPU for a run's total batch: mmdet's convention is total = per GPU x GPUs
    (its `auto_scale_lr` counts so), and the run's learning rate is the one for its total."""
    return max(1, total // max(1, devices))


class GpuPool:
    """The worker's GPUs: each job leases the ones it trains on, first come first served."""

    def __init__(self, devices: Sequence[str] = ()) -> None:
        self.devices = tuple(devices)
        self._free = list(self.devices)
        self._waiting: deque[tuple[int, asyncio.Future[tuple[str, ...]]]] = deque()

    def would_wait(self, count: int) -> bool:
        count = min(count, len(self.devices))
        return count > 0 and (bool(self._waiting) or len(self._free) < count)

    async def acquire(self, count: int, *, unless: asyncio.Event) -> tuple[str, ...] | None:
        """`count` free GPUs (at most all of them; none for 0), once the jobs that asked
        before have theirs; None when `unless` is set first."""
        count = min(count, len(self.devices))
        if unless.is_set():
            return None
        if count <= 0:
            return ()
        if not self.would_wait(count):
            return self._take(count)
        grant: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        entry = (count, grant)
        self._waiting.append(entry)
        stopped: asyncio.Future[object] = asyncio.ensure_future(unless.wait())
        try:
            await asyncio.wait((grant, stopped), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(entry)
            raise
        finally:
            stopped.cancel()
        if unless.is_set():
            self._abandon(entry)
            return None
        return grant.result()

    def release(self, devices: Sequence[str]) -> None:
        self._free.extend(devices)
        self._free.sort(key=self.devices.index)
        self._grant()

    def _take(self, count: int) -> tuple[str, ...]:
        taken = tuple(self._free[:count])
        del self._free[:count]
        return taken

    def _grant(self) -> None:
        # In order: a job waiting for several GPUs is not overtaken by later single-GPU ones.
        while self._waiting and len(self._free) >= self._waiting[0][0]:
            count, grant = self._waiting.popleft()
            grant.set_result(self._take(count))

    def _abandon(self, entry: tuple[int, asyncio.Future[tuple[str, ...]]]) -> None:
        _, grant = entry
        if grant.done():
            self.release(grant.result())
            return
        grant.cancel()
        self._waiting.remove(entry)
        # The next in line may fit now.
        self._grant()
