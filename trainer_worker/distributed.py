"""The training child's part in a run over several GPUs (imported only in the child).

The worker starts such a run with torch's distributed launcher (`torch.distributed.run`),
which sets RANK, LOCAL_RANK and WORLD_SIZE for each rank; mmengine's
`launcher="pytorch"` reads them. Each rank trains on one GPU of the run's
CUDA_VISIBLE_DEVICES; rank 0 alone reports events and, as mmengine does, saves
checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

from trainer_worker.devices import per_device_batch
from trainer_worker.protocol import EVENT_PATH_ENV


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def open_event_channel() -> int | None:
    """The parent's event FIFO, opened for writing by rank 0; None elsewhere, or without
    a parent (a manual run)."""
    path = os.environ.get(EVENT_PATH_ENV)
    if not path or not is_rank_zero():
        return None
    # Non-blocking open: with its parent gone (no reader), it fails instead of waiting.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


def use_launcher(cfg: Any) -> None:
    """Makes the config train under the distributed launcher when it started this process
    as one of several ranks; a single process is left as it is.

    The run's batch size is its total over all ranks: each loads its share.
    """
    world = world_size()
    if world <= 1:
        return
    import torch

    cfg.launcher = "pytorch"
    loader = cfg.train_dataloader
    loader.batch_size = per_device_batch(loader.batch_size, world)
    if torch.cuda.is_available():
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "nccl"
        return
    # Ranks on CPU (how machines without a GPU test this path): mmengine's launcher would
    # pin each to a CUDA device, so the process group is made here, over gloo, and the
    # model wrapped for CPU.
    torch.distributed.init_process_group(backend="gloo")
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False
    )
