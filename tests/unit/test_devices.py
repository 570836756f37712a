"""The worker's GPUs: discovery without torch, leases, concurrency, and the child's command."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path

import pytest

from shared.proto.raven.training.v1 import training_run_pb2
from trainer_worker.child import child_command, free_port
from trainer_worker.devices import (
    GpuPool,
    parse_cuda_visible_devices,
    parse_nvidia_smi_list,
    per_device_batch,
    visible_gpus,
    worker_concurrency,
)
from trainer_worker.job import WorkerEnvironment
from trainer_worker.placement import device_env, gpus_wanted

Spec = training_run_pb2.TrainingSpec

TWO_GPUS = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1f7c2e-7d1a-4f0e-9c1e-1a2b3c4d5e6f)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-9e8d7c6b-5a49-4382-a1b0-f0e1d2c3b4a5)
"""
ONE_SPLIT_INTO_MIG = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-11111111-2222-3333-4444-555555555555)
  MIG 3g.20gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
  MIG 3g.20gb     Device  1: (UUID: MIG-ffffffff-0000-1111-2222-333333333333)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-66666666-7777-8888-9999-000000000000)
"""


def test_nvidia_smi_gpus_are_named_by_uuid_and_mig_instances_replace_their_gpu() -> None:
    assert parse_nvidia_smi_list(TWO_GPUS) == (
        "GPU-0b1f7c2e-7d1a-4f0e-9c1e-1a2b3c4d5e6f",
        "GPU-9e8d7c6b-5a49-4382-a1b0-f0e1d2c3b4a5",
    )
    assert parse_nvidia_smi_list(ONE_SPLIT_INTO_MIG) == (
        "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "MIG-ffffffff-0000-1111-2222-333333333333",
        "GPU-66666666-7777-8888-9999-000000000000",
    )
    assert parse_nvidia_smi_list("No devices were found\n") == ()


def test_cuda_visible_devices_stops_at_the_first_invalid_entry_as_cuda_does() -> None:
    assert parse_cuda_visible_devices("0,1") == ("0", "1")
    assert parse_cuda_visible_devices(" GPU-abc , 3") == ("GPU-abc", "3")
    assert parse_cuda_visible_devices("") == ()
    assert parse_cuda_visible_devices("-1") == ()
    assert parse_cuda_visible_devices("2,-1,3") == ("2",)


def fake_nvidia_smi(folder: Path, *, output: str, status: int = 0) -> dict[str, str]:
    """A PATH whose nvidia-smi prints `output` for `-L`: the driver's tool, outside the system."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    # Shell builtins only: this PATH has nothing else.
    tool.write_text(
        f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\nprintf '%s' '{output}'\nexit {status}\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return {"PATH": str(folder)}


def test_gpus_come_from_cuda_visible_devices_else_from_nvidia_smi(tmp_path: Path) -> None:
    environ = fake_nvidia_smi(tmp_path / "bin", output=TWO_GPUS)
    assert visible_gpus(environ) == parse_nvidia_smi_list(TWO_GPUS)
    # A worker started with CUDA_VISIBLE_DEVICES hands out exactly those, or none.
    assert visible_gpus({**environ, "CUDA_VISIBLE_DEVICES": "1"}) == ("1",)
    assert visible_gpus({**environ, "CUDA_VISIBLE_DEVICES": ""}) == ()


def test_without_a_working_nvidia_smi_no_gpu_is_found(tmp_path: Path) -> None:
    assert visible_gpus({"PATH": str(tmp_path / "empty")}) == ()
    failing = fake_nvidia_smi(
        tmp_path / "bin",
        output="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
        status=9,
    )
    assert visible_gpus(failing) == ()


def test_concurrency_defaults_to_one_job_per_gpu_and_one_without() -> None:
    assert worker_concurrency(None, 0) == 1
    assert worker_concurrency(None, 4) == 4
    assert worker_concurrency(2, 4) == 2
    assert worker_concurrency(3, 0) == 3


def test_the_total_batch_is_split_over_the_gpus() -> None:
    assert per_device_batch(8, 2) == 4
    assert per_device_batch(10, 4) == 2
    assert per_device_batch(1, 2) == 1
    assert per_device_batch(4, 1) == 4


async def test_concurrent_leases_get_distinct_gpus_and_wait_for_a_free_one() -> None:
    pool = GpuPool(("0", "1"))
    never = asyncio.Event()
    first = await pool.acquire(1, unless=never)
    second = await pool.acquire(1, unless=never)
    assert {first, second} == {("0",), ("1",)}
    assert pool.would_wait(1)

    third = asyncio.create_task(pool.acquire(1, unless=never))
    await asyncio.sleep(0)
    assert not third.done()
    assert first is not None
    pool.release(first)
    assert await asyncio.wait_for(third, 1) == first


async def test_a_run_waiting_for_several_gpus_is_not_overtaken() -> None:
    pool = GpuPool(("0", "1"))
    never = asyncio.Event()
    held = await pool.acquire(1, unless=never)
    both = asyncio.create_task(pool.acquire(2, unless=never))
    later = asyncio.create_task(pool.acquire(1, unless=never))
    await asyncio.sleep(0)
    assert not both.done() and not later.done(), "one GPU is free, but the first in line needs two"

    assert held is not None
    pool.release(held)
    assert await asyncio.wait_for(both, 1) == ("0", "1")
    assert not later.done()
    pool.release(both.result())
    assert await asyncio.wait_for(later, 1) == ("0",)


async def test_a_stopped_wait_gives_up_its_place_and_takes_nothing() -> None:
    pool = GpuPool(("0",))
    never, stop = asyncio.Event(), asyncio.Event()
    held = await pool.acquire(1, unless=never)
    stopped = asyncio.create_task(pool.acquire(1, unless=stop))
    cancelled = asyncio.create_task(pool.acquire(1, unless=never))
    after = asyncio.create_task(pool.acquire(1, unless=never))
    await asyncio.sleep(0)

    stop.set()
    assert await asyncio.wait_for(stopped, 1) is None
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert held is not None
    pool.release(held)
    assert await asyncio.wait_for(after, 1) == ("0",)


async def test_cpu_runs_and_workers_without_gpus_lease_nothing() -> None:
    never = asyncio.Event()
    assert await GpuPool().acquire(1, unless=never) == ()
    busy = GpuPool(("0",))
    await busy.acquire(1, unless=never)
    assert await asyncio.wait_for(busy.acquire(0, unless=never), 1) == ()


def environment(*gpus: str, device: str = "auto") -> WorkerEnvironment:
    return WorkerEnvironment(artifact_root=Path("/nonexistent"), device=device, gpus=GpuPool(gpus))


def test_a_run_takes_the_gpus_it_asks_for_or_all_the_worker_has() -> None:
    four = environment("0", "1", "2", "3")
    assert gpus_wanted(Spec(device=Spec.GPU, gpu_count=2), four) == (2, "")
    assert gpus_wanted(Spec(device=Spec.GPU), four) == (1, "")
    assert gpus_wanted(Spec(device=Spec.AUTO), four) == (1, "")
    assert gpus_wanted(Spec(device=Spec.GPU, gpu_count=4), environment("0", "1")) == (
        2,
        "4 GPUs requested, this worker has 2: it trains on 2",
    )


def test_cpu_runs_and_cpu_workers_hide_every_gpu() -> None:
    assert gpus_wanted(Spec(device=Spec.CPU), environment("0")) == (None, "")
    assert gpus_wanted(Spec(device=Spec.GPU, gpu_count=2), environment("0", "1", device="cpu")) == (
        None,
        "this worker trains on CPU only",
    )
    assert device_env((), cpu=True) == {"CUDA_VISIBLE_DEVICES": ""}


def test_without_known_gpus_the_child_uses_what_torch_finds_on_one_device() -> None:
    assert gpus_wanted(Spec(device=Spec.GPU), environment()) == (0, "")
    assert gpus_wanted(Spec(device=Spec.GPU, gpu_count=2), environment()) == (
        0,
        "2 GPUs requested: this worker trains on one device",
    )
    assert device_env((), cpu=False) == {}
    assert device_env(("GPU-a", "GPU-b"), cpu=False) == {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}


def test_one_process_trains_alone_and_several_under_the_launcher_on_a_free_port() -> None:
    config = Path("/runs/1/config.py")
    assert child_command(config) == [
        sys.executable,
        "-m",
        "trainer_worker.train_process",
        str(config),
    ]

    port = free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
    command = child_command(config, processes=2, port=port)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    options = command[3:-3]
    assert "--nproc-per-node=2" in options
    assert "--master-addr=127.0.0.1" in options
    assert f"--master-port={port}" in options
    assert command[-3:] == ["-m", "trainer_worker.train_process", str(config)]
