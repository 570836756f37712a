"""Runs one training in a child process and turns its end into an outcome.

The parent never imports torch: it spawns `trainer_worker.train_process` (one
process, or one rank per GPU under torch's distributed launcher), reads its event
lines from a FIFO, and on a clean exit collects the best epoch's checkpoint, the
resolved config, the metrics and the split into the run's artifact folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from shared.metrics import best_epoch
from shared.storage import sha256_file
from trainer_worker import storage_faults
from trainer_worker.devices import DataLoading
from trainer_worker.failures import describe_crash
from trainer_worker.protocol import (
    EVENT_PATH_ENV,
    EXIT_CANCELLED,
    EXIT_DIVERGED,
    ChildEvent,
    EpochsRestored,
    EpochTrained,
    Evaluated,
    LossDiverged,
    ProtocolError,
    TrainingStarted,
    checkpoint_epochs,
    decode,
    weights_file,
)

log = structlog.get_logger(__name__)

# A child that ignores SIGTERM this long is killed.
_STOP_GRACE_S = 60.0
# How long events may still arrive after the child exited (a process it left behind may
# hold the FIFO open: it must not hold the run).
_DRAIN_S = 10.0
# Enough of the log's end to hold the last traceback.
_LOG_TAIL_BYTES = 64 * 1024
_CHECKOUT = Path(__file__).resolve().parents[1]
_LINE_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactFile:
    kind: str  # "config" | "checkpoint" | "metrics" | "split" | "log"
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochRecord:
    epoch: int
    train: Mapping[str, float] = field(default_factory=dict)
    val: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSucceeded:
    artifacts: tuple[ArtifactFile, ...]
    best_epoch: int
    # Empty when no epoch produced metrics.
    best_metrics: Mapping[str, float]
    epochs: tuple[EpochRecord, ...]
    epochs_trained: int
    duration_s: float
    parameter_count: int
    device: str
    # The test split's evaluation with the best epoch's checkpoint; None without a test split.
    test_evaluation: Evaluated | None = None
    # Images each validation evaluated (the worker knows its split); 0: unknown.
    val_image_count: int = 0
    # How the run's dataloaders loaded; None: unknown (a training outside a worker).
    data_loading: DataLoading | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFailed:
    reason: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingCancelled:
    pass


TrainingOutcome = TrainingSucceeded | TrainingFailed | TrainingCancelled
EventCallback = Callable[[ChildEvent], Awaitable[None]]


@dataclass(slots=True)
class _Observed:
    device: str = ""
    parameter_count: int = 0
    train: dict[int, Mapping[str, float]] = field(default_factory=dict)
    val: dict[int, Mapping[str, float]] = field(default_factory=dict)
    # Epochs an earlier attempt trained; this attempt's own records take precedence.
    restored_train: dict[int, Mapping[str, float]] = field(default_factory=dict)
    restored_val: dict[int, Mapping[str, float]] = field(default_factory=dict)
    # The test split's evaluation after training: never an epoch of the series.
    test: Evaluated | None = None
    diverged: str = ""

    def record(self, event: ChildEvent) -> None:
        if isinstance(event, TrainingStarted):
            self.device, self.parameter_count = event.device, event.parameter_count
        elif isinstance(event, EpochTrained):
            self.train[event.epoch] = event.losses
        elif isinstance(event, Evaluated) and event.split == "test":
            self.test = event
        elif isinstance(event, Evaluated):
            self.val[event.epoch] = event.metrics
        elif isinstance(event, EpochsRestored):
            for entry in event.epochs:
                epoch = int(entry["epoch"])
                if entry.get("train"):
                    self.restored_train[epoch] = entry["train"]
                if entry.get("val"):
                    self.restored_val[epoch] = entry["val"]
        elif isinstance(event, LossDiverged):
            self.diverged = event.message

    def series(self) -> tuple[dict[int, Mapping[str, float]], dict[int, Mapping[str, float]]]:
        """Train and val records of every epoch of the run, earlier attempts' included."""
        return {**self.restored_train, **self.train}, {**self.restored_val, **self.val}


async def run_training(
    *,
    config_path: Path,
    work_dir: Path,
    artifact_dir: Path,
    split_path: Path,
    log_path: Path,
    on_event: EventCallback,
    stop: asyncio.Event | None = None,
    env: Mapping[str, str] | None = None,
    processes: int = 1,
) -> TrainingOutcome:
    """Trains with the mmengine config at `config_path` (whose work_dir is `work_dir`).

    `on_event` sees every child event as it arrives. Setting `stop` asks the child
    to stop at its next iteration; a child that finished first still succeeds.
    Cancelling the calling task kills the child. With `processes` > 1, torch's
    distributed launcher starts that many ranks, one per GPU of `env`'s
    CUDA_VISIBLE_DEVICES, and rank 0 reports.
    """
    started = time.monotonic()
    await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
    # Checkpoints in the work dir before training are earlier epochs' (place_checkpoint).
    placed = await asyncio.to_thread(checkpoint_epochs, work_dir)
    observed = _Observed()

    async def record(event: ChildEvent) -> None:
        observed.record(event)
        await on_event(event)

    returncode = await _run_child(
        child_command(config_path, processes=processes, port=free_port() if processes > 1 else 0),
        env={
            **os.environ,
            **(env or {}),
            # mmengine checkpoints hold pickled objects; the only checkpoints a child loads
            # are the ones this system wrote or verified by sha256 before the run.
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
            "PYTHONUNBUFFERED": "1",
        },
        log_path=log_path,
        on_event=record,
        stop=stop,
    )
    duration = time.monotonic() - started
    log.info(
        "training ended", config=str(config_path), returncode=returncode, seconds=round(duration, 1)
    )

    # Under the launcher, a rank's own exit status becomes the launcher's failure: the
    # events say what happened.
    if returncode == EXIT_DIVERGED or (returncode != 0 and observed.diverged):
        return TrainingFailed(reason="diverged", message=observed.diverged or "the loss diverged")
    if returncode == EXIT_CANCELLED or (stop is not None and stop.is_set() and returncode != 0):
        return TrainingCancelled()
    if returncode != 0:
        log_text = await asyncio.to_thread(_tail, log_path)
        # A checkpoint or a log line that could not be written is no crash of the training.
        fault = await asyncio.to_thread(storage_faults.diagnose, work_dir, log_text)
        if fault is not None:
            return TrainingFailed(reason=fault[0], message=storage_faults.message(*fault))
        return TrainingFailed(
            reason="training_crashed",
            message=describe_crash(
                log_text, returncode=returncode, roots=(log_path.parent, _CHECKOUT)
            ),
        )
    try:
        return await asyncio.to_thread(
            _collect,
            observed=observed,
            placed=placed,
            work_dir=work_dir,
            config_path=config_path,
            artifact_dir=artifact_dir,
            split_path=split_path,
            log_path=log_path,
            duration_s=duration,
        )
    except OSError as error:
        fault = storage_faults.fault_of(error, within=artifact_dir.parent.parent)
        if fault is None:
            raise
        return TrainingFailed(reason=fault[0], message=storage_faults.message(*fault))


def place_checkpoint(source: Path, work_dir: Path, *, epoch: int) -> None:
    """Puts an earlier attempt's checkpoint of `epoch` into this attempt's work dir before
    training, so that the best checkpoint is chosen among that epoch too."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / f"epoch_{epoch}.pth"
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        # Another file system: training prunes and moves the work dir's files, so a copy.
        shutil.copyfile(source, target)


def _collect(
    *,
    observed: _Observed,
    placed: set[int],
    work_dir: Path,
    config_path: Path,
    artifact_dir: Path,
    split_path: Path,
    log_path: Path,
    duration_s: float,
) -> TrainingOutcome:
    train, val = observed.series()
    last_epoch = max(train, default=0)
    # Chosen among this attempt's epochs and the earlier ones whose checkpoints were placed
    # in the work dir, as the child's PruneCheckpointsHook chooses it.
    restored = {e: m for e, m in observed.restored_val.items() if e in placed}
    best = best_epoch({**restored, **observed.val}, last_epoch=last_epoch)
    checkpoint = work_dir / f"epoch_{best}.pth"
    if best is None or not checkpoint.is_file():
        return TrainingFailed(
            reason="training_incomplete",
            message=f"training exited cleanly without a checkpoint for epoch {best} in {work_dir}",
        )
    epochs = tuple(
        EpochRecord(epoch=e, train=train.get(e, {}), val=val.get(e, {}))
        for e in sorted(set(train) | set(val))
    )
    artifact_dir.mkdir(parents=True, exist_ok=True)
    # mmengine dumps the config it ran, `_base_` resolved: it loads without our files.
    resolved = work_dir / config_path.name
    shutil.copyfile(resolved if resolved.is_file() else config_path, artifact_dir / "config.py")
    # The model's checkpoint holds its weights: the optimizer state only served resuming.
    weights = work_dir / weights_file(best)
    os.replace(weights if weights.is_file() else checkpoint, artifact_dir / "checkpoint.pth")
    for stale in work_dir.glob("epoch_*.pth"):
        stale.unlink(missing_ok=True)
    shutil.copyfile(split_path, artifact_dir / "split.json")
    shutil.copyfile(log_path, artifact_dir / "train.log")
    # Only an evaluation of the checkpoint the model keeps describes the model.
    tested = observed.test if observed.test and observed.test.epoch == best else None
    (artifact_dir / "metrics.json").write_text(
        json.dumps(
            {
                "best_epoch": best,
                "epochs": [
                    {"epoch": r.epoch, "train": dict(r.train), "val": dict(r.val)} for r in epochs
                ],
                **({"test": _test_entry(tested)} if tested else {}),
                "parameter_count": observed.parameter_count,
                "device": observed.device,
                "duration_s": round(duration_s, 3),
            },
            indent=2,
        )
    )
    artifacts = tuple(
        _artifact(kind, artifact_dir / name)
        for kind, name in (
            ("config", "config.py"),
            ("checkpoint", "checkpoint.pth"),
            ("metrics", "metrics.json"),
            ("split", "split.json"),
            ("log", "train.log"),
        )
    )
    return TrainingSucceeded(
        artifacts=artifacts,
        best_epoch=best,
        best_metrics=val.get(best, {}),
        epochs=epochs,
        epochs_trained=last_epoch,
        duration_s=duration_s,
        parameter_count=observed.parameter_count,
        device=observed.device,
        test_evaluation=tested,
    )


def _test_entry(tested: Evaluated) -> dict[str, object]:
    return {
        "epoch": tested.epoch,
        "image_count": tested.image_count,
        "metrics": dict(tested.metrics),
    }


def _artifact(kind: str, path: Path) -> ArtifactFile:
    return ArtifactFile(
        kind=kind, path=path, size_bytes=path.stat().st_size, sha256=sha256_file(path)
    )


async def _run_child(
    command: list[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    on_event: EventCallback,
    stop: asyncio.Event | None,
) -> int:
    """Runs the training child to its end, relaying its events; its exit status."""
    channel = _EventChannel()
    try:
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env={**env, EVENT_PATH_ENV: str(channel.path)},
            )
        log.info("training started", pid=process.pid, command=command[1:])

        async def relay() -> None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=_LINE_LIMIT)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), channel.reader
            )
            try:
                while line := await reader.readline():
                    try:
                        event = decode(line)
                    except ProtocolError as error:
                        log.warning("ignored a bad event line", error=str(error))
                        continue
                    await on_event(event)
            finally:
                transport.close()

        async def stop_on_request() -> None:
            if stop is None:
                return
            await stop.wait()
            # The launcher passes SIGTERM on to every rank.
            _signal(process, signal.SIGTERM)
            await asyncio.sleep(_STOP_GRACE_S)
            _kill(process)

        stopper = asyncio.create_task(stop_on_request())
        relaying = asyncio.create_task(relay())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({relaying, exited}, return_when=asyncio.FIRST_COMPLETED)
            if relaying.done():
                # Only a failing `on_event` ends the relay before the child: stop the child.
                relaying.result()
            returncode = await exited
            channel.release_writer()
            drained, _ = await asyncio.wait({relaying}, timeout=_DRAIN_S)
            if drained:
                relaying.result()
            else:
                log.warning("a process the training child left holds its events open")
        except BaseException:
            _signal(process, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), _STOP_GRACE_S)
            _kill(process)
            raise
        finally:
            for task in (stopper, relaying, exited):
                task.cancel()
            await asyncio.wait({stopper, relaying, exited})
        return returncode
    finally:
        channel.close()


def child_command(config_path: Path, *, processes: int = 1, port: int = 0) -> list[str]:
    """The training child's command line: one process, or `processes` ranks started by
    torch's distributed launcher, which rendezvous on loopback at `port`."""
    child = ["-m", "trainer_worker.train_process", str(config_path)]
    if processes <= 1:
        return [sys.executable, *child]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        # A failed rank fails the attempt; the worker records it, and a retry resumes.
        "--max-restarts=0",
        *child,
    ]


def free_port() -> int:
    """A TCP port free on loopback now, for one run's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _EventChannel:
    """The FIFO the child writes its events to, opened by path: torch's launcher closes
    inherited descriptors, so a pipe's descriptor would not reach rank 0.

    The parent holds a write end of its own until the child has exited: the reader then
    sees end-of-file only after the child's last event, not before the child opened it.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="raven-events-")
        self.path = Path(self._folder.name) / "events"
        os.mkfifo(self.path, 0o600)
        self.reader = os.fdopen(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK), "rb", 0)
        self._writer: int | None = os.open(self.path, os.O_WRONLY)

    def release_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def close(self) -> None:
        self.release_writer()
        self.reader.close()
        self._folder.cleanup()


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL for the child and every process under it: the launcher's ranks run in
    sessions of their own, and one blocked in a collective never handles SIGTERM."""
    if process.returncode is not None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    _signal(process, signal.SIGKILL)
    for descendant in descendants:
        with contextlib.suppress(psutil.Error):
            descendant.kill()


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
