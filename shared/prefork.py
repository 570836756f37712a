"""Several processes of one service on one port (RAVEN_GRPC_PROCESSES), as gRPC Python
recommends (grpc/grpc examples/python/multiprocessing): the parent forks the children
before anything of gRPC or asyncio exists in it, and every child binds the same port with
`grpc.so_reuseport`, so the kernel spreads new connections over them.

Every child serves gRPC, health, its EventHub (one NATS subscription to every run's
events: a watcher on any child sees every run) and claims (a queue group). Child 0 alone
runs the background loops: the JetStream consumers apply one run's reports in order only
within one process, and the relay, retention and recovery would only wait on their locks
in the others. Child i serves `/metrics` on the configured port + i. Without
RAVEN_PAGE_TOKEN_KEYS, the random key `shared.pagination` draws at import is the parent's,
inherited by every child (and every restarted one): a page token of one child is good on all.

The parent holds the port (bound with SO_REUSEPORT, never listening) so that port 0 is
chosen once for all, forwards SIGTERM and SIGINT to the children as SIGTERM, and restarts
a child that dies, under the same index (a new child 0 takes the loops back). More than
`MAX_RESTARTS` deaths within `RESTART_WINDOW_S`: it stops the others and exits 1, and the
orchestrator's restart with backoff takes over, as for a single process that cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import structlog

from shared import logs, pagination
from shared.observability.metrics_addresses import metrics_address, split_address
from shared.process import run_process
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.runtime import ServiceApp

log = structlog.get_logger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# How long the children have to stop after SIGTERM before they are killed.
STOP_TIMEOUT_S = 30.0
# How often a child checks that its parent still runs.
PARENT_CHECK_S = 1.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True, slots=True)
class Child:
    """What a child knows of its place: its index among the service's processes."""

    index: int
    parent_pid: int

    @property
    def runs_background_loops(self) -> bool:
        return self.index == 0

    async def watch_parent(self) -> None:
        """Returns when the parent is gone (killed without forwarding a stop), so that no
        child keeps serving on its own."""
        while True:
            await asyncio.sleep(PARENT_CHECK_S)
            if os.getppid() != self.parent_pid:
                log.error("the parent process is gone; stopping", parent_pid=self.parent_pid)
                return


def child_address(address: str, port: int) -> str:
    """`address` with the port the parent reserved: "0.0.0.0:0" -> "0.0.0.0:50051"."""
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"


def child_metrics_address(setting: str | None, default: str, index: int) -> str:
    """Where child `index` serves `/metrics`: the configured port + index ("off" stays off,
    port 0 stays a free port of each child's own)."""
    address = metrics_address(setting, default)
    if address is None:
        return "off"
    _, port = split_address(address)
    return address if port == 0 else child_address(address, port + index)


def reserve_port(address: str) -> socket.socket:
    """A socket bound to `address` with SO_REUSEPORT, not listening: it keeps the port for
    the children (the kernel hands connections only to listening sockets)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Parent:
    def __init__(self, app: type[ServiceApp], settings: Settings, port: int) -> None:
        self._app = app
        self._settings = settings
        self._port = port
        self._context = multiprocessing.get_context("fork")
        self._children: dict[int, BaseProcess] = {}
        self._deaths: deque[float] = deque()
        self._stop_requested = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def run(self) -> int:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        for index in range(self._settings.grpc_processes):
            self._start(index)
        failed = False
        while not self._stop_requested and not failed:
            ready = wait([self._wake_r, *(c.sentinel for c in self._children.values())])
            if self._wake_r in ready:
                break
            for index, child in list(self._children.items()):
                if child.is_alive() or self._stop_requested:
                    continue
                log.error("service process died", process=index, exit_code=child.exitcode)
                if self._too_many_deaths():
                    log.error(
                        "service processes keep dying; stopping",
                        deaths=len(self._deaths),
                        window_s=RESTART_WINDOW_S,
                    )
                    failed = True
                    break
                self._start(index)
        clean = self._stop_children()
        return 1 if failed or not clean else 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_requested = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - RESTART_WINDOW_S:
            self._deaths.popleft()
        return len(self._deaths) > MAX_RESTARTS

    def _start(self, index: int) -> None:
        child = Child(index=index, parent_pid=os.getpid())
        settings = self._settings.model_copy(
            update={
                self._app.address_setting: child_address(self._app_address(), self._port),
                "metrics_addr": child_metrics_address(
                    self._settings.metrics_addr, self._app.metrics_default, index
                ),
            }
        )
        process = self._context.Process(
            target=_child_main,
            args=(self._app, settings, child, (self._wake_r, self._wake_w)),
            name=f"{self._app.client_name}-{index}",
        )
        # A stop signal that arrives while forking waits for the child's own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        self._children[index] = process
        log.info("service process started", process=index, pid=process.pid)

    def _app_address(self) -> str:
        return str(getattr(self._settings, self._app.address_setting))

    def _stop_children(self) -> bool:
        """SIGTERM to every child, then waits; True when each stopped cleanly in time."""
        for child in self._children.values():
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        clean = True
        for index, child in self._children.items():
            child.join(max(deadline - time.monotonic(), 0))
            if child.is_alive():
                log.error("service process did not stop; killing it", process=index)
                child.kill()
                child.join()
                clean = False
            # Killed by the signal before its handlers were installed: stopped as asked.
            elif child.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
        return clean


def _child_main(
    app: type[ServiceApp], settings: Settings, child: Child, wake: tuple[int, int]
) -> None:
    for fd in wake:
        os.close(fd)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    run_process(_ChildApp(app, child), settings=settings)


@dataclass(frozen=True, slots=True)
class _ChildApp:
    """Builds the service of one child, as `run_process` builds a service class."""

    app: type[ServiceApp]
    child: Child

    @property
    def client_name(self) -> str:
        return self.app.client_name

    def __call__(self, settings: Settings) -> ServiceApp:
        return self.app(settings, child=self.child)


def serve(app: type[ServiceApp], settings: Settings) -> None:
    """Runs `settings.grpc_processes` processes of `app` on its one port until SIGTERM or
    SIGINT; exits 1 when the children kept dying or did not stop cleanly."""
    logs.configure(settings.log_level, json=settings.log_json)
    # Before the fork: every child signs page tokens with the same keys (see above).
    pagination.use_keys(settings.page_token_key_list())
    address = str(getattr(settings, app.address_setting))
    with reserve_port(address) as reserved:
        port = int(reserved.getsockname()[1])
        log.info(
            "serving with several processes",
            address=address,
            port=port,
            processes=settings.grpc_processes,
        )
        status = _Parent(app, settings, port).run()
    log.info("service processes stopped", exit_code=status)
    raise SystemExit(status)
