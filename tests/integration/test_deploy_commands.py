"""Every command that deploy/ has a container run (entry points, health checks, probes, the
one-shot volume preparation), run here against the real stack with the environment its
file gives it: container paths point at folders of this test, `python` is this one.

Compose: prepare-volumes copies `make certs`' files for uid 10001, both services and a
worker start from their entry points with compose's environment and those copies, and the
health checks (compose's and the Dockerfiles') pass against them. Kubernetes: the probes
pass against the test stack's servers with the ConfigMap's environment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest

from shared.auth.certs import ensure_dev_certs
from shared.infra import Infrastructure
from shared.settings import Settings
from tests import pki as test_pki
from tests.integration.deploy_files import (
    DEPLOY,
    REPO,
    Command,
    compose,
    compose_commands,
    dockerfile_commands,
    every_command,
    k8s_commands,
)
from tests.support import eventually

pytestmark = pytest.mark.timeout(180)

UID = 10001
ENTRY_POINTS = {"services.training_runs.main", "services.trained_models.main", "trainer_worker"}
PROBES = {"shared.auth.probe", "trainer_worker.health"}


def _module(command: Command) -> str:
    argv = command.argv
    if argv[:2] == ("python", "-m"):
        return argv[2]
    if argv[:2] == ("sh", "-c"):
        return "shell"
    if argv[0] == "sh" and argv[1].endswith("prepare-volumes.sh"):
        return "prepare-volumes"
    return "?"


def test_this_suite_runs_every_command_of_deploy() -> None:
    kinds = {c.where: _module(c) for c in every_command()}
    known = ENTRY_POINTS | PROBES | {"shell", "prepare-volumes"}
    assert {w: k for w, k in kinds.items() if k not in known} == {}
    shells = [c.argv[2] for c in every_command() if _module(c) == "shell"]
    for line in shells:
        for part in line.split("||"):
            assert part.split()[:3] == ["python", "-m", "shared.auth.probe"], line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mapped(value: str, paths: Mapping[str, Path], ports: Mapping[str, int]) -> str:
    for inside, outside in paths.items():
        if value == inside or value.startswith(inside + "/"):
            value = str(outside) + value[len(inside) :]
    for address, port in ports.items():
        value = value.replace(address, f"127.0.0.1:{port}")
    return value


def _argv(command: Command, paths: Mapping[str, Path], ports: Mapping[str, int]) -> list[str]:
    argv = [_mapped(a, paths, ports) for a in command.argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[:2] == ["sh", "-c"]:
        argv[2] = argv[2].replace("python -m", f"{sys.executable} -m")
    return argv


def _env(
    command: Command,
    paths: Mapping[str, Path],
    overrides: Mapping[str, str | None],
) -> dict[str, str]:
    """`command`'s environment, paths mapped, with `overrides` (None: unset)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAVEN_")}
    declared = {k: _mapped(v, paths, {}) for k, v in command.env.items()}
    merged = {**base, **declared, **overrides}
    return {k: v for k, v in merged.items() if v is not None}


def _run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


async def _arun(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_run, argv, env)


# --- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes() -> Iterator[Path]:
    """Where compose's volumes and bind mounts live in this test: a folder that uid 10001
    may traverse (pytest's own are root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("handing files to uid 10001 needs root")
    folder = Path(tempfile.mkdtemp(prefix="raven-compose-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# Where compose takes `make certs`' files from: the folder the services and the CLI use.
DEV_CERTS_SOURCE = "${RAVEN_DEV_CERTS_DIR-${HOME}/.config/raven/certs}"


def _compose_paths(volumes: Path, certs: Path) -> dict[str, Path]:
    """Container path -> host path, from the compose services' volume lists."""
    paths: dict[str, Path] = {}
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source == DEV_CERTS_SOURCE:
                paths[target] = certs
            elif source.startswith("."):
                paths[target] = (DEPLOY / source).resolve()
            else:
                paths[target] = volumes / source
    # The worker's health file, in the container's /tmp.
    paths["/tmp/raven-worker.health"] = volumes / "worker.health"
    return paths


@pytest.fixture(scope="module")
def dev_certs(volumes: Path) -> Path:
    """`make certs`' files, as it leaves them: a 0700 folder, 0600 keys, the CA key too."""
    certs, _ = ensure_dev_certs(volumes / "host-certs")
    return certs.directory


def _reads_as_uid(path: Path) -> bool:
    done = subprocess.run(
        ["/bin/cat", str(path)], user=UID, group=UID, extra_groups=[], capture_output=True
    )
    return done.returncode == 0


def _compose_command(where: str) -> Command:
    (command,) = [c for c in compose_commands() if c.where == where]
    return command


@pytest.fixture(scope="module")
def prepared(volumes: Path, dev_certs: Path) -> dict[str, Path]:
    paths = _compose_paths(volumes, dev_certs)
    command = _compose_command("compose prepare-volumes")
    done = _run(_argv(command, paths, {}), _env(command, paths, {}))
    assert done.returncode == 0, done.stderr
    return paths


def test_prepare_volumes_hands_the_certificates_and_artifacts_to_the_image_user(
    prepared: dict[str, Path], dev_certs: Path
) -> None:
    tls, artifacts = prepared["/etc/raven/tls"], prepared["/var/lib/raven/artifacts"]
    # The problem it solves: uid 10001 cannot read `make certs`' key.
    assert not _reads_as_uid(dev_certs / "server.key")
    assert sorted(p.name for p in tls.iterdir()) == [
        "ca.crt",
        "policy.toml",
        "server.crt",
        "server.key",
    ]
    for path in tls.iterdir():
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, UID, 0o440)
        assert _reads_as_uid(path), path.name
    assert artifacts.stat().st_uid == UID
    probe = subprocess.run(
        ["/usr/bin/touch", str(artifacts / "written-by-10001")], user=UID, group=UID, check=False
    )
    assert probe.returncode == 0
    # Again (after `make certs --force`): the same, with no trace of the CA key.
    command = _compose_command("compose prepare-volumes")
    again = _run(_argv(command, prepared, {}), _env(command, prepared, {}))
    assert again.returncode == 0, again.stderr
    assert not (tls / "ca.key").exists()


def test_prepare_volumes_refuses_to_run_without_certificates(volumes: Path) -> None:
    empty = volumes / "no-certs"
    empty.mkdir(exist_ok=True)
    paths = _compose_paths(volumes / "other", empty)
    command = _compose_command("compose prepare-volumes")
    done = _run(_argv(command, paths, {}), _env(command, paths, {}))
    assert done.returncode == 1
    assert "make certs" in done.stderr


@contextlib.asynccontextmanager
async def _process(argv: list[str], env: Mapping[str, str], log: Path) -> AsyncIterator[None]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), cwd=REPO, stdout=out, stderr=out
        )
    try:
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        text = await asyncio.to_thread(log.read_text)
        print(f"--- {log.name}\n{text[-3000:]}")


async def test_compose_entry_points_serve_and_pass_their_health_checks(
    prepared: dict[str, Path], settings: Settings, nc: object, volumes: Path
) -> None:
    ports = {"127.0.0.1:50051": _free_port(), "127.0.0.1:50052": _free_port()}
    # The stack of this test session in place of compose's postgres and nats (plain NATS:
    # no NATS TLS here).
    stack: dict[str, str | None] = {
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": settings.nats_namespace,
        "RAVEN_NATS_TLS_CA_FILE": None,
        "RAVEN_NATS_TLS_CERT_FILE": None,
        "RAVEN_NATS_TLS_KEY_FILE": None,
        "RAVEN_METRICS_ADDR": "off",
        "RAVEN_TRAINING_RUNS_ADDR": f"127.0.0.1:{ports['127.0.0.1:50051']}",
        "RAVEN_TRAINED_MODELS_ADDR": f"127.0.0.1:{ports['127.0.0.1:50052']}",
        "RAVEN_WORKER_DEVICE": "cpu",
    }
    services = ["training-runs", "trained-models", "trainer-worker"]
    checks = {name: _compose_command(f"compose {name} healthcheck") for name in services}
    async with contextlib.AsyncExitStack() as running:
        for name in services:
            entry = _compose_command(f"compose {name}")
            env = _env(entry, prepared, stack)
            await running.enter_async_context(
                _process(_argv(entry, prepared, ports), env, volumes / f"{name}.log")
            )
        for check in checks.values():
            argv, env = _argv(check, prepared, ports), _env(check, prepared, stack)

            async def passes(argv: list[str] = argv, env: dict[str, str] = env) -> bool:
                return (await _arun(argv, env)).returncode == 0

            await eventually(passes, timeout=60, interval=0.5)
        # The images' own HEALTHCHECKs, with the compose environment.
        for command in dockerfile_commands():
            if "HEALTHCHECK" not in command.where:
                continue
            env = _env(_compose_command("compose trainer-worker"), prepared, stack)
            done = await _arun(_argv(command, prepared, ports), env)
            assert done.returncode == 0, (command.where, done.stderr)
    # Stopped: every health check fails.
    for name, check in checks.items():
        done = await _arun(_argv(check, prepared, ports), _env(check, prepared, stack))
        if name != "trainer-worker":
            assert done.returncode == 1, name
    # A stopped worker leaves no health file behind.
    assert not (volumes / "worker.health").exists()
    worker = checks["trainer-worker"]
    done = await _arun(_argv(worker, prepared, ports), _env(worker, prepared, stack))
    assert done.returncode == 1 and "no health file" in done.stderr


async def test_the_compose_postgres_health_check_runs(infrastructure: Infrastructure) -> None:
    if shutil.which("pg_isready") is None:
        pytest.skip("pg_isready is not installed here")
    (test,) = [compose()["services"]["postgres"]["healthcheck"]["test"]]
    host, port = infrastructure.database_url.split("@", 1)[1].split("/")[0].rsplit(":", 1)
    argv = [*test[1:], "-h", host, "-p", port]
    assert (await _arun(argv, os.environ)).returncode == 0
    closed = [*test[1:], "-h", "127.0.0.1", "-p", str(_free_port())]
    assert (await _arun(closed, os.environ)).returncode != 0


async def test_the_nats_config_serves_mtls_and_its_health_check_passes(
    volumes: Path, dev_certs: Path
) -> None:
    """deploy/nats/nats.conf as compose runs it (certificates where prepare-volumes puts
    them), on free ports; the compose health check, then a client with the service's
    certificate and compose's credentials."""
    import nats

    from shared.infra.nats import binary
    from shared.messaging import NatsSecurity

    client_port, http_port = _free_port(), _free_port()
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    conf = conf.replace("port: 4222", f"port: {client_port}")
    conf = conf.replace("http_port: 8222", f"http_port: {http_port}")
    conf = conf.replace("/data/jetstream", str(volumes / "jetstream"))
    conf = conf.replace("/etc/nats/tls", str(dev_certs))
    (volumes / "nats.conf").write_text(conf)
    env = {**os.environ, "NATS_PASSWORD": "compose-test-password"}
    async with _process(
        [str(binary()), "-c", str(volumes / "nats.conf")], env, volumes / "nats.log"
    ):
        (test,) = [compose()["services"]["nats"]["healthcheck"]["test"]]
        argv = [a.replace("127.0.0.1:8222", f"127.0.0.1:{http_port}") for a in test[1:]]

        async def healthy() -> bool:
            return (await _arun(argv, os.environ)).returncode == 0

        await eventually(healthy, timeout=20, interval=0.2)
        security = NatsSecurity(
            ca_file=dev_certs / "ca.crt",
            cert_file=dev_certs / "server.crt",
            key_file=dev_certs / "server.key",
        )
        connection = await nats.connect(
            f"tls://raven:compose-test-password@127.0.0.1:{client_port}",
            max_reconnect_attempts=0,
            **security.options(),
        )
        try:
            await connection.jetstream().account_info()
        finally:
            await connection.close()


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_paths(pki: test_pki.Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pod's mounts: its SVID as tls.crt/tls.key with ca.crt, the policy ConfigMap,
    the health emptyDir."""
    root = tmp_path_factory.mktemp("pod")
    tls = root / "tls"
    tls.mkdir()
    shutil.copy(pki.server_cert, tls / "tls.crt")
    shutil.copy(pki.server_key, tls / "tls.key")
    shutil.copy(pki.ca_file, tls / "ca.crt")
    return {"/etc/raven/tls": tls, "/tmp/raven": root / "health"}


async def test_the_kubernetes_service_probes_pass_against_the_running_services(
    k8s_paths: dict[str, Path], training_runs, trained_models
) -> None:
    probes = [c for c in k8s_commands() if _module(c) == "shared.auth.probe"]
    assert len(probes) == 6
    ports = {"127.0.0.1:50051": training_runs.port, "127.0.0.1:50052": trained_models.port}
    for probe in probes:
        done = await _arun(_argv(probe, k8s_paths, ports), _env(probe, k8s_paths, {}))
        assert done.returncode == 0, (probe.where, done.stderr)
    # Nobody serving there: the probe fails.
    nobody = {address: _free_port() for address in ports}
    done = await _arun(_argv(probes[0], k8s_paths, nobody), _env(probes[0], k8s_paths, {}))
    assert done.returncode == 1


async def test_the_kubernetes_worker_probes_follow_a_running_worker(
    k8s_paths: dict[str, Path], settings: Settings, nc: object, tmp_path: Path
) -> None:
    probes = [c for c in k8s_commands() if _module(c) == "trainer_worker.health"]
    assert {p.where.rsplit(" ", 1)[1] for p in probes} == {
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
    }
    (entry,) = [c for c in k8s_commands() if c.argv[2:] == ("trainer_worker",)]
    stack: dict[str, str | None] = {
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": settings.nats_namespace,
        "RAVEN_NATS_TLS_CA_FILE": None,
        "RAVEN_NATS_TLS_CERT_FILE": None,
        "RAVEN_NATS_TLS_KEY_FILE": None,
        "RAVEN_WORKER_DEVICE": "cpu",
        "RAVEN_WORKER_ID": "k8s-probe-worker",
        "RAVEN_METRICS_ADDR": "off",
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
    }
    for probe in probes:
        done = await _arun(_argv(probe, k8s_paths, {}), _env(probe, k8s_paths, {}))
        assert done.returncode == 1, probe.where  # no worker yet
    async with _process(
        _argv(entry, k8s_paths, {}), _env(entry, k8s_paths, stack), tmp_path / "worker.log"
    ):
        for probe in probes:
            argv, env = _argv(probe, k8s_paths, {}), _env(probe, k8s_paths, {})

            async def passes(argv: list[str] = argv, env: dict[str, str] = env) -> bool:
                return (await _arun(argv, env)).returncode == 0

            await eventually(passes, timeout=60, interval=0.5)
        # A file older than --max-age: a stuck worker fails its liveness probe.
        stale = [*_argv(probes[0], k8s_paths, {}), "--max-age", "0"]
        done = await _arun(stale, _env(probes[0], k8s_paths, {}))
        assert done.returncode == 1 and "last reported" in done.stderr
    for probe in probes:
        done = await _arun(_argv(probe, k8s_paths, {}), _env(probe, k8s_paths, {}))
        assert done.returncode == 1, probe.where  # stopped
