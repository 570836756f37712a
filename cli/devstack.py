"""The local stack as processes: infrastructure, both gRPC servers and a trainer worker.

`raven stack up` starts them detached (logs in .data/logs, pid files in
.data/run) and returns; `raven demo` starts them in the foreground and stops
them when it ends. Both pass the infrastructure's URLs to the children through
RAVEN_* variables, which is all the children read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.client import client_tls
from shared.auth import transport
from shared.auth.certs import ensure_dev_certs
from shared.auth.transport import ClientTls
from shared.infra import Infrastructure, embedded_status, ensure_infrastructure, stop_embedded
from shared.observability.metrics_addresses import (
    TRAINED_MODELS_METRICS_ADDR,
    TRAINING_RUNS_METRICS_ADDR,
    WORKER_METRICS_ADDR,
    metrics_address,
)
from shared.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
# A worker that dies this soon after its start is misconfigured, not busy.
WORKER_SETTLE_S = 1.5


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    module: str
    # The Settings field with its gRPC address; None for processes without a server.
    address_setting: str | None
    # Where it serves /metrics when RAVEN_METRICS_ADDR is unset.
    metrics_default: str = ""

    def address(self, settings: Settings) -> str | None:
        return getattr(settings, self.address_setting) if self.address_setting else None

    def metrics_address(self, settings: Settings) -> str | None:
        """Where it serves Prometheus /metrics; None when metrics are off."""
        return metrics_address(settings.metrics_addr, self.metrics_default)


# Start order: the training-runs server migrates the database before the others use it.
COMPONENTS = (
    Component(
        "training-runs",
        "services.training_runs.main",
        "training_runs_addr",
        TRAINING_RUNS_METRICS_ADDR,
    ),
    Component(
        "trained-models",
        "services.trained_models.main",
        "trained_models_addr",
        TRAINED_MODELS_METRICS_ADDR,
    ),
    Component("trainer-worker", "trainer_worker", None, WORKER_METRICS_ADDR),
)


class StackError(RuntimeError):
    """A component would not start; the message carries the end of its log."""


@dataclass(frozen=True, slots=True)
class Layout:
    data_dir: Path

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run(self) -> Path:
        return self.data_dir / "run"

    @property
    def state_file(self) -> Path:
        return self.run / "stack.json"

    def pid_file(self, component: Component) -> Path:
        return self.run / f"{component.name}.pid"

    def log_file(self, component: Component) -> Path:
        return self.logs / f"{component.name}.log"


@dataclass(frozen=True, slots=True)
class StackState:
    """What `stack up` started, for `stack status` and the user."""

    database_url: str
    nats_url: str
    embedded: tuple[str, ...]
    artifact_root: str
    training_runs_addr: str
    trained_models_addr: str


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    component: Component
    pid: int | None
    serving: bool | None  # None: the component has no gRPC server.


def layout_for(data_dir: Path) -> Layout:
    return Layout(data_dir.expanduser().resolve())


def child_environment(settings: Settings, infra: Infrastructure) -> dict[str, str]:
    return {
        **os.environ,
        **_server_tls_environment(settings),
        "RAVEN_DATABASE_URL": infra.database_url,
        "RAVEN_NATS_URL": infra.nats_url,
        "RAVEN_NATS_NAMESPACE": settings.nats_namespace,
        "RAVEN_ARTIFACT_ROOT": str(settings.resolved_artifact_root()),
        "RAVEN_TRAINING_RUNS_ADDR": settings.training_runs_addr,
        "RAVEN_TRAINED_MODELS_ADDR": settings.trained_models_addr,
        # One key for the stack's processes (a restarted service keeps accepting its tokens).
        "RAVEN_PAGE_TOKEN_KEYS": settings.page_token_keys or _stack_key(settings),
        "PYTHONUNBUFFERED": "1",
    }


def _stack_key(settings: Settings) -> str:
    """A random page-token key kept beside the stack's artifacts, created on first use."""
    path = settings.resolved_artifact_root().parent / "page-token.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _server_tls_environment(settings: Settings) -> dict[str, str]:
    """The servers serve mTLS with the development certificates (`make certs`) and a policy
    that makes the CLI `admin`; nothing in development plaintext mode."""
    if settings.insecure_dev:
        return {}
    dev, _ = ensure_dev_certs(settings.dev_certs_dir)
    return {
        "RAVEN_TLS_CERT_FILE": str(dev.server.cert),
        "RAVEN_TLS_KEY_FILE": str(dev.server.key),
        "RAVEN_TLS_CA_FILE": str(dev.ca),
        "RAVEN_AUTH_POLICY_FILE": str(settings.auth_policy_file or dev.policy),
    }


def running_pid(layout: Layout, component: Component) -> int | None:
    """The pid in the component's pid file, if that process still runs this component."""
    try:
        pid = int(layout.pid_file(component).read_text().strip())
        process = psutil.Process(pid)
        # A recycled pid runs something else: match the command line, not just the pid.
        alive = process.status() != psutil.STATUS_ZOMBIE
        if alive and component.module in process.cmdline():
            return pid
    except (FileNotFoundError, ValueError, psutil.Error):
        pass
    return None


def is_serving(address: str, tls: ClientTls | None, *, timeout: float = 1.0) -> bool:
    """True when grpc.health.v1.Health/Check at `address` answers SERVING."""
    with transport.channel(address, tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def log_tail(path: Path, *, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _spawn(component: Component, layout: Layout, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path = layout.log_file(component)
    with log_path.open("ab") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} start ===\n".encode())
        log.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", component.module],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal reaches the CLI only, which stops
            # the children in order instead of all at once.
            start_new_session=True,
        )
    layout.pid_file(component).write_text(f"{process.pid}\n")
    return process


def _wait_started(
    component: Component, process: subprocess.Popen[bytes], settings: Settings, layout: Layout
) -> None:
    address = component.address(settings)
    deadline = time.monotonic() + (START_TIMEOUT_S if address else WORKER_SETTLE_S)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            layout.pid_file(component).unlink(missing_ok=True)
            raise StackError(
                f"{component.name} exited with {process.returncode}; "
                f"{layout.log_file(component)} ends with:\n{log_tail(layout.log_file(component))}"
            )
        if address and is_serving(address, client_tls(settings)):
            return
        time.sleep(0.2)
    if address:
        stop_pids([process.pid])
        layout.pid_file(component).unlink(missing_ok=True)
        raise StackError(
            f"{component.name} did not report SERVING on {address} within {START_TIMEOUT_S:.0f}s; "
            f"see {layout.log_file(component)}"
        )


def stop_pids(pids: list[int], *, grace: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM to all at once (each shuts down gracefully on it), SIGKILL to those still
    running after `grace` seconds; returns the pids that had to be killed."""
    processes = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.send_signal(signal.SIGTERM)
            processes.append(process)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [process.pid for process in alive]


def start(
    settings: Settings,
    data_dir: Path,
    *,
    detached: bool,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[Infrastructure, list[tuple[Component, subprocess.Popen[bytes]]], list[Component]]:
    """Infrastructure, then each component not already running; returns (infra, started, found).

    detached=True: everything outlives this process (`stack up`). detached=False: the
    embedded servers stop when this process exits; the caller stops the children.
    """
    layout = layout_for(data_dir)
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.run.mkdir(parents=True, exist_ok=True)
    started_at = time.monotonic()
    infra = ensure_infrastructure(settings, layout.data_dir, keep_running=detached)
    for name in ("postgres", "nats"):
        where = "embedded, in " + str(layout.data_dir) if name in infra.embedded else "configured"
        say(f"{name}: {where} ({time.monotonic() - started_at:.1f}s)")
    env = child_environment(settings, infra)
    started: list[tuple[Component, subprocess.Popen[bytes]]] = []
    found: list[Component] = []
    try:
        for component in COMPONENTS:
            if running_pid(layout, component) is not None:
                found.append(component)
                continue
            address = component.address(settings)
            if address and is_serving(address, client_tls(settings)):
                raise StackError(
                    f"something else already serves {address}; stop it or set "
                    f"RAVEN_{(component.address_setting or '').upper()}"
                )
            process = _spawn(component, layout, env)
            started.append((component, process))
            began = time.monotonic()
            _wait_started(component, process, settings, layout)
            where = f", {address}" if address else ""
            say(f"{component.name}: pid {process.pid}{where} ({time.monotonic() - began:.1f}s)")
    except BaseException:
        stop_started(layout, started)
        raise
    state = StackState(
        database_url=infra.database_url,
        nats_url=infra.nats_url,
        embedded=infra.embedded,
        artifact_root=str(settings.resolved_artifact_root()),
        training_runs_addr=settings.training_runs_addr,
        trained_models_addr=settings.trained_models_addr,
    )
    layout.state_file.write_text(json.dumps(asdict(state), indent=2) + "\n")
    return infra, started, found


def stop_started(
    layout: Layout, started: list[tuple[Component, subprocess.Popen[bytes]]]
) -> list[str]:
    """Stops the children this process started; returns their names."""
    running = [(c, p) for c, p in started if p.poll() is None]
    try:
        stop_pids([p.pid for _, p in running])
    except KeyboardInterrupt:
        # A second Ctrl-C while they shut down: no more waiting.
        for _, process in running:
            process.kill()
    for component, process in started:
        process.wait()
        layout.pid_file(component).unlink(missing_ok=True)
    return [c.name for c, _ in running]


@contextmanager
def foreground(
    settings: Settings, data_dir: Path, *, say: Callable[[str], None] = lambda _: None
) -> Iterator[Infrastructure]:
    """The stack for the length of a `with` block (the demo): stopped at its end, Ctrl-C too."""
    layout = layout_for(data_dir)
    # SIGTERM (a CI timeout, `kill`) must clean up like Ctrl-C does, not leave orphans.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        infra, started, _ = start(settings, data_dir, detached=False, say=say)
        try:
            yield infra
        finally:
            stopped = stop_started(layout, started)
            if stopped:
                say(f"stopped {', '.join(stopped)}")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def down(data_dir: Path) -> list[str]:
    """Stops every component with a live pid file, then the embedded servers.

    Returns what was stopped; one that ignored SIGTERM for STOP_GRACE_S is marked killed.
    """
    layout = layout_for(data_dir)
    pids = {c: pid for c in COMPONENTS if (pid := running_pid(layout, c)) is not None}
    killed = set(stop_pids(list(pids.values())))
    stopped = [f"{c.name} (killed)" if pid in killed else c.name for c, pid in pids.items()]
    for component in COMPONENTS:
        layout.pid_file(component).unlink(missing_ok=True)
    stopped += [f"{name} (embedded)" for name in stop_embedded(layout.data_dir)]
    layout.state_file.unlink(missing_ok=True)
    return stopped


def status(settings: Settings, data_dir: Path) -> list[ComponentStatus]:
    layout = layout_for(data_dir)
    rows = []
    for component in COMPONENTS:
        pid = running_pid(layout, component)
        address = component.address(settings)
        serving = is_serving(address, client_tls(settings)) if address and pid is not None else None
        rows.append(ComponentStatus(component, pid, serving if address else None))
    return rows


def recorded_state(data_dir: Path) -> StackState | None:
    try:
        raw = json.loads(layout_for(data_dir).state_file.read_text())
        raw["embedded"] = tuple(raw["embedded"])
        return StackState(**raw)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def embedded_pids(data_dir: Path) -> dict[str, int | None]:
    return embedded_status(layout_for(data_dir).data_dir)
