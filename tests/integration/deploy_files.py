"""What deploy/ declares, read for the deploy tests: manifests, and every command a
container runs (entry points, health checks, probes) with the environment it runs in."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = K8S / "grafana" / "raven-training.json"

# The metrics the processes export (docs/operations.md, "Deploy"); alerts and the
# dashboard may name no other.
METRICS = frozenset(
    {
        "raven_grpc_server_handled_total",
        "raven_grpc_server_handling_seconds",
        "raven_grpc_server_handling_seconds_bucket",
        "raven_training_runs",
        "raven_outbox_backlog_messages",
        "raven_outbox_oldest_message_age_seconds",
        "raven_jetstream_consumer_pending_messages",
        "raven_lost_worker_recoveries_total",
        "raven_worker_jobs_running",
        "raven_worker_run_images_per_second",
    }
)


@dataclass(frozen=True, slots=True)
class Command:
    """One command a container runs: where it is declared, its argv (exec form; a shell
    form is ["sh", "-c", line]) and the environment given to it there."""

    where: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def _interpolated(value: str) -> str:
    """Compose's ${NAME:?message} and ${NAME} with a placeholder value."""
    return re.sub(r"\$\{([A-Z_]+)[^}]*\}", "placeholder", value)


def compose_commands() -> list[Command]:
    commands = []
    for name, service in compose()["services"].items():
        env = {k: _interpolated(str(v)) for k, v in (service.get("environment") or {}).items()}
        run = [*service.get("entrypoint", []), *service.get("command", [])]
        if run and "image" in service and service["image"].startswith("raven-"):
            commands.append(Command(f"compose {name}", tuple(run), env))
        test = (service.get("healthcheck") or {}).get("test")
        if test and service.get("image", "").startswith("raven-"):
            assert test[0] == "CMD", f"compose {name}: exec-form health checks only"
            commands.append(Command(f"compose {name} healthcheck", tuple(test[1:]), env))
    return commands


def _config_env() -> dict[str, str]:
    for _, document in k8s_documents():
        if document["kind"] == "ConfigMap" and document["metadata"]["name"] == "raven-training":
            return {k: str(v) for k, v in document["data"].items()}
    raise AssertionError("no raven-training ConfigMap")


def k8s_commands() -> list[Command]:
    config = _config_env()
    commands = []
    for file, document in k8s_documents():
        if document["kind"] != "Deployment":
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            env = {**config}
            env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
            where = f"{file} {container['name']}"
            commands.append(Command(where, tuple(container["command"]), env))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    argv = tuple(container[probe]["exec"]["command"])
                    commands.append(Command(f"{where} {probe}", argv, env))
    return commands


def _dockerfile_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for match in re.finditer(r"^ENV ((?:.*\\\n)*.*)$", text, re.MULTILINE):
        for pair in shlex.split(match.group(1).replace("\\\n", " ")):
            if "=" in pair:
                key, value = pair.split("=", 1)
                env[key] = value
    return env


def dockerfile_commands() -> list[Command]:
    commands = []
    for path in sorted(DEPLOY.glob("Dockerfile.*")):
        text = path.read_text()
        env = _dockerfile_env(text)
        joined = text.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.startswith("CMD "):
                commands.append(Command(f"{path.name} CMD", tuple(json.loads(line[4:])), env))
            elif line.startswith("HEALTHCHECK "):
                _, run = line.split(" CMD ", 1)
                run = run.strip()
                argv = tuple(json.loads(run)) if run.startswith("[") else ("sh", "-c", run)
                commands.append(Command(f"{path.name} HEALTHCHECK", argv, env))
    return commands


def every_command() -> list[Command]:
    return [*compose_commands(), *k8s_commands(), *dockerfile_commands()]
