"""The training child process: `python -m trainer_worker.train_process <config.py>`.

One process per run, so that a crash, an OOM kill or a hung CUDA call ends the
run and not the worker. Events go to the file descriptor in `RAVEN_EVENT_FD`;
mmengine's own logs go to stdout/stderr, which the parent sends to a file.
SIGTERM or SIGUSR1 stops training at the next iteration (exit status 3); a NaN
or infinite loss ends it with exit status 4.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

from trainer_worker.protocol import (
    EVENT_FD_ENV,
    EXIT_CANCELLED,
    EXIT_DIVERGED,
    LossDiverged,
    TrainingStopped,
)

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} CONFIG.py\n")
        return 2
    _die_with_parent()

    # Imported after the usage check: they take seconds (torch).
    from trainer_worker.hooks import (
        CancelHook,
        CheckpointReportHook,
        DivergenceHook,
        EventWriter,
        ProgressHook,
        PruneCheckpointsHook,
        TrainingCancelled,
        TrainingDiverged,
    )

    cancel = CancelHook()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda *_: cancel.request())
    fd = os.environ.get(EVENT_FD_ENV)
    writer = EventWriter(int(fd) if fd else None)

    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(argv[1])
    reset = tuple(cfg.get("raven", {}).get("reset_weights", ()))
    if cfg.get("load_from") and reset:
        cfg.load_from = str(
            _without_weights(Path(cfg.load_from), reset, Path(cfg.work_dir) / "base_model.pth")
        )

    _use_amp_on_cuda(cfg)

    runner = Runner.from_cfg(cfg)
    runner.register_hook(cancel)
    runner.register_hook(DivergenceHook())
    runner.register_hook(ProgressHook(writer))
    runner.register_hook(CheckpointReportHook(writer))
    runner.register_hook(PruneCheckpointsHook())
    try:
        runner.train()
    except TrainingCancelled:
        writer.send(TrainingStopped(epoch=runner.epoch + 1, iter=runner.iter))
        return EXIT_CANCELLED
    except TrainingDiverged as error:
        writer.send(LossDiverged(message=str(error)))
        return EXIT_DIVERGED
    return 0


def _use_amp_on_cuda(cfg: Any) -> None:
    """Mixed precision on CUDA unless the run turned it off; CPU runs stay in float32."""
    import torch

    wanted = cfg.get("raven", {}).get("mixed_precision")
    if wanted is not False and torch.cuda.is_available():
        cfg.optim_wrapper.type = "AmpOptimWrapper"


def _without_weights(source: Path, prefixes: tuple[str, ...], target: Path) -> Path:
    """A copy of a checkpoint without the class-dependent weights, so that they start fresh
    even when the class count happens to match."""
    import torch

    checkpoint: Any = torch.load(source, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": kept, "meta": checkpoint.get("meta", {})}, target)
    return target


def _die_with_parent() -> None:
    """A worker killed with SIGKILL must not leave its training running (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
