"""The training child process: its command line, its event FIFO, and how it is stopped.

The parent never imports torch: it spawns `trainer_worker.train_process` (one process,
or one rank per GPU under torch's distributed launcher) and reads its event lines from a
FIFO opened by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import psutil
import structlog

from trainer_worker.protocol import EVENT_PATH_ENV, ChildEvent, ProtocolError, decode

log = structlog.get_logger(__name__)

# A child that ignores SIGTERM this long is killed.
_STOP_GRACE_S = 60.0
# How long events may still arrive after the child exited (a process it left behind may
# hold the FIFO open: it must not hold the run).
_DRAIN_S = 10.0
# Enough of the log's end to hold the last traceback.
_LOG_TAIL_BYTES = 64 * 1024
_LINE_LIMIT = 4 * 1024 * 1024

EventCallback = Callable[[ChildEvent], Awaitable[None]]


async def run_child(
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


def tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
