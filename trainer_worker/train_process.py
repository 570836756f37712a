"""The training child process: `python -m trainer_worker.train_process <config.py>`.

One process per run, so that a crash, an OOM kill or a hung CUDA call ends the
run and not the worker; a run over several GPUs has one per GPU, started by torch's
distributed launcher (trainer_worker.distributed). Events go to the FIFO in
`RAVEN_EVENT_PATH`; mmengine's own logs go to stdout/stderr, which the parent sends
to a file.
SIGTERM or SIGUSR1 stops training at the next iteration (exit status 3); a NaN
or infinite loss ends it with exit status 4. When the config has a test split
(`raven.test_after_training`), the child evaluates it once with the best
epoch's checkpoint after training, in the same process: the model and the
training stack are already loaded.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

from trainer_worker.distributed import is_rank_zero, open_event_channel, use_launcher
from trainer_worker.protocol import (
    EXIT_CANCELLED,
    EXIT_DIVERGED,
    LossDiverged,
    TrainingStopped,
    weights_file,
)

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} CONFIG.py\n")
        return 2
    _die_with_parent()

    # Imported after the usage check: they take seconds (torch).
    from trainer_worker.checkpoint_hooks import (
        CheckpointReportHook,
        PruneCheckpointsHook,
        evaluate_test_split,
    )
    from trainer_worker.hooks import (
        CancelHook,
        DivergenceHook,
        EventWriter,
        TrainingCancelled,
        TrainingDiverged,
    )
    from trainer_worker.progress_hook import ProgressHook

    cancel = CancelHook()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda *_: cancel.request())
    writer = EventWriter(open_event_channel())

    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(argv[1])
    reset = tuple(cfg.get("raven", {}).get("reset_weights", ()))
    if cfg.get("load_from") and reset:
        cfg.load_from = str(
            _weights_only(
                Path(cfg.load_from),
                Path(cfg.work_dir) / "base_model.pth",
                drop=reset,
                untrusted=True,
            )
        )

    _use_amp_on_cuda(cfg)
    _dump_detections(cfg)
    use_launcher(cfg)
    deterministic = bool(cfg.get("raven", {}).get("deterministic"))
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read at its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    runner = Runner.from_cfg(cfg)
    if deterministic:
        import torch

        # mmengine turned deterministic algorithms on (cfg.randomness); an operation that
        # has no deterministic CUDA kernel warns in the log instead of ending the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    runner.register_hook(cancel)
    runner.register_hook(DivergenceHook())
    runner.register_hook(ProgressHook(writer))
    runner.register_hook(CheckpointReportHook(writer))
    prune = PruneCheckpointsHook()
    runner.register_hook(prune)
    try:
        runner.train()
        best = prune.best(runner)
        if cfg.get("raven", {}).get("test_after_training") and best is not None:
            evaluate_test_split(runner, epoch=best, writer=writer)
        if best is not None and is_rank_zero():
            # What the model keeps: weights and meta, no weight dropped. Optimizer state
            # serves resuming, which the epoch checkpoints are for.
            checkpoint = Path(cfg.work_dir) / f"epoch_{best}.pth"
            if checkpoint.is_file():
                _weights_only(checkpoint, checkpoint.with_name(weights_file(best)))
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


def _dump_detections(cfg: Any) -> None:
    """Each evaluation leaves its detections in the work dir (trainer_worker.detections):
    the run's report pictures the kept model's predictions with them."""
    from trainer_worker import detections

    work_dir = Path(cfg.work_dir)
    detections.folder(work_dir).mkdir(parents=True, exist_ok=True)
    cfg.val_evaluator.outfile_prefix = detections.outfile_prefix(work_dir, "val")
    # Without a test split the config's test evaluator is its val evaluator, never run.
    if cfg.get("raven", {}).get("test_after_training"):
        cfg.test_evaluator.outfile_prefix = detections.outfile_prefix(work_dir, "test")


def _weights_only(
    source: Path, target: Path, *, drop: tuple[str, ...] = (), untrusted: bool = False
) -> Path:
    """A copy of a checkpoint with its weights and meta only (no optimizer state), less the
    weights whose names start with `drop`: class-dependent weights start fresh even when
    the class count happens to match. `untrusted` (a base model's checkpoint, possibly
    imported): loaded with `weights_only=True`, as the import verified it."""
    import torch

    if untrusted:
        from trainer_worker.verify import safe_globals

        with torch.serialization.safe_globals(safe_globals()):
            checkpoint: Any = torch.load(source, map_location="cpu", weights_only=True)
    else:
        # This run's own checkpoint, written by this child.
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    kept = {k: v for k, v in state.items() if not k.startswith(drop)}
    target.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a distributed run writes it: each whole, then renamed into place.
    partial = target.with_name(f"{target.name}.{os.getpid()}")
    torch.save({"state_dict": kept, "meta": checkpoint.get("meta", {})}, partial)
    os.replace(partial, target)
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
