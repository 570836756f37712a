"""deploy/ checked without a Docker daemon or a cluster: the Kubernetes manifests against
the Kubernetes schemas (kubernetes-validate ships them), the compose file against the
Compose Specification's schema (vendored in deploy/schema, from the PyPI package
docker-compose==1.29.2, compose/config/compose_spec.json), the alerts and the dashboard's
queries as PromQL over the metrics the processes export."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.integration.deploy_files import (
    DASHBOARD,
    DEPLOY,
    K8S,
    METRICS,
    REPO,
    compose,
    k8s_documents,
)

# A recent Kubernetes whose schemas kubernetes-validate ships (strict: unknown fields fail).
KUBERNETES = "1.33.0"
# The Prometheus Operator's kinds have no schema there: checked below by hand.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\braven_[a-z_]+\b", expr))


def _check_promql(expr: str, where: str) -> None:
    try:
        promql_parser.parse(expr)
    except ValueError as error:
        raise AssertionError(f"{where}: {expr!r} is not PromQL: {error}") from error
    unknown = _metric_names(expr) - METRICS
    assert not unknown, f"{where}: no process exports {sorted(unknown)}"


@pytest.mark.parametrize(
    ("file", "document"),
    [
        pytest.param(f, d, id=f"{f}:{d['kind']}/{d['metadata']['name']}")
        for f, d in k8s_documents()
        if d["kind"] not in OPERATOR_KINDS
    ],
)
def test_each_manifest_matches_the_kubernetes_schema(file: str, document: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{file}: {error.message} at {list(error.path)}")


def test_the_kustomization_names_every_manifest_and_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert (K8S / name).is_file(), name
    images = {i["name"] for i in kustomization["images"]}
    for _, document in k8s_documents():
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                assert container["image"] in images


def _deployments() -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d["kind"] == "Deployment"]


def test_every_container_has_probes_requests_and_limits() -> None:
    for deployment in _deployments():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            name = container["name"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{name} has no {probe}"
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name} {kind}"


def test_every_deployment_has_a_disruption_budget() -> None:
    budgets = [d for _, d in k8s_documents() if d["kind"] == "PodDisruptionBudget"]
    covered = [b["spec"]["selector"]["matchLabels"] for b in budgets]
    for deployment in _deployments():
        assert deployment["spec"]["selector"]["matchLabels"] in covered


def test_services_on_tls_ports_do_not_declare_plaintext_http2() -> None:
    for _, document in k8s_documents():
        if document["kind"] != "Service":
            continue
        for port in document["spec"]["ports"]:
            if port["name"] == "grpc":
                # The servers speak mTLS only: h2c would have a mesh speak plaintext to them.
                assert port.get("appProtocol") == "https", document["metadata"]["name"]


def _policies() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"] for _, d in k8s_documents() if d["kind"] == "NetworkPolicy"
    }


def _labels(deployment: str) -> dict[str, str]:
    for document in _deployments():
        if document["metadata"]["name"] == deployment:
            return dict(document["spec"]["template"]["metadata"]["labels"])
    raise AssertionError(deployment)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admitted(policies: dict[str, dict[str, Any]], target: dict[str, str], port: int) -> list:
    """The `from` entries of the policies that let connections to `port` of `target` in."""
    entries = []
    for spec in policies.values():
        if not _selects(spec["podSelector"], target):
            continue
        for rule in spec.get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [])):
                entries += rule["from"]
    return entries


def test_network_policies_let_only_the_mesh_in_and_only_the_backbone_to_its_data() -> None:
    policies = _policies()
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    services = [_labels("training-runs"), _labels("trained-models")]
    worker = _labels("trainer-worker")
    for labels, port in zip(services, (50051, 50052), strict=True):
        sources = _admitted(policies, labels, port)
        assert sources == [{"namespaceSelector": {"matchLabels": {"raven.example/mesh": "member"}}}]
    postgres = _admitted(policies, {"app.kubernetes.io/name": "postgres"}, 5432)
    nats = _admitted(policies, {"app.kubernetes.io/name": "nats"}, 4222)
    for sources, allowed in ((postgres, services), (nats, [*services, worker])):
        assert sources and all(set(s) == {"podSelector"} for s in sources)
        for labels in allowed:
            assert any(_selects(s["podSelector"], labels) for s in sources)
    # Postgres: the workers never connect to it.
    assert not any(_selects(s["podSelector"], worker) for s in postgres)


def _operator_documents(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d["kind"] == kind]


def test_the_service_monitor_scrapes_every_process() -> None:
    (monitor,) = _operator_documents("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [e["port"] for e in monitor["spec"]["endpoints"]]
    services = [d for _, d in k8s_documents() if d["kind"] == "Service"]
    exporting = {
        d["spec"]["selector"]["app.kubernetes.io/name"]
        for d in services
        if _selects(monitor["spec"]["selector"], d["metadata"]["labels"])
        and any(p["name"] in scraped for p in d["spec"]["ports"])
    }
    assert exporting == {"training-runs", "trained-models", "trainer-worker"}


def test_the_alerts_are_promql_over_exported_metrics() -> None:
    (rules,) = _operator_documents("PrometheusRule")
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {}
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            _check_promql(rule["expr"], rule["alert"])
            alerts[rule["alert"]] = rule["expr"]
    # What docs/operations.md promises an alert for.
    assert "raven_outbox_oldest_message_age_seconds" in alerts["RavenOutboxBacklogStale"]
    assert "60" in alerts["RavenOutboxBacklogStale"]
    assert 'raven_training_runs{state="QUEUED"}' in alerts["RavenRunsQueuedWithoutWorker"]
    assert "raven_lost_worker_recoveries_total" in alerts["RavenWorkersLost"]
    assert "raven_grpc_server_handled_total" in alerts["RavenRpcErrorRate"]


def test_the_dashboard_queries_are_promql_over_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert queries
    for query in queries:
        _check_promql(query, dashboard["title"])
    shown = set().union(*(_metric_names(q) for q in queries))
    assert shown >= METRICS - {"raven_grpc_server_handling_seconds"}


def _compose_schema() -> dict[str, Any]:
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    # The project name: added to the specification after that release.
    schema["properties"]["name"] = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"}
    return dict(schema)


def test_the_compose_file_matches_the_compose_specification() -> None:
    # The schema's own draft ("$schema": draft 2019-09).
    validator = jsonschema.Draft201909Validator(_compose_schema())
    validator.validate(compose())
    # The schema does catch mistakes (an unknown key, a bad health check).
    broken = compose()
    broken["services"]["training-runs"]["healthcheck"]["tset"] = ["CMD", "true"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_the_compose_containers_mount_no_host_certificates_but_the_one_shot_copy() -> None:
    services = compose()["services"]
    for name, service in services.items():
        host_mounts = [v for v in service.get("volumes", []) if v.startswith(("../.data", "$"))]
        if name == "prepare-volumes":
            assert host_mounts == ["${RAVEN_DEV_CERTS_DIR-${HOME}/.config/raven/certs}:/certs:ro"]
        else:
            assert host_mounts == [], name
    for name in ("training-runs", "trained-models", "trainer-worker", "nats"):
        depends = services[name]["depends_on"]
        starts_after = "prepare-volumes" in depends or "training-runs" in depends
        assert starts_after, name


def test_the_docker_build_context_leaves_out_local_data_and_caches() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".data", "**/__pycache__", ".mypy_cache"} <= ignored
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert "HEALTHCHECK" in text, dockerfile.name
        assert "install -d -o 10001 -g 10001" in text, dockerfile.name
