"""The benchmark harness still runs: `python -m benchmarks --smoke` against the real
stack, then the shape of its JSON. Measurements, not tests: no timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory, infrastructure) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # The servers this session found or started, not embedded ones of its own.
    env = {
        **os.environ,
        "RAVEN_DATABASE_URL": infrastructure.database_url,
        "RAVEN_NATS_URL": infrastructure.nats_url,
    }
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads((out / "latest-smoke.json").read_text())


def test_the_document_describes_the_run(document: dict) -> None:
    assert document["mode"] == "smoke"
    assert document["machine"]["logical_cpus"] >= 1
    assert document["versions"]["grpcio"]
    assert "training" in document["skipped"]


@pytest.mark.parametrize(
    "name",
    [
        "unary.echo.c1.throughput",
        "unary.get.c64.throughput",
        "unary.list_first.c16.p50",
        "unary.list_deep.c16.p99",
        "unary.create.c1.p50",
        "events.nats.w1.p50",
        "events.run1.w10.p99",
        "events.fleet.max",
        "events.fleet.backlog_s",
        "events.recorded.w1.p99",
        "events.apply.rate",
        "outbox.commit_to_ack.p50",
        "outbox.relay_rate",
        "dataset.prepare.seconds",
        "dataset.prepare.peak_rss",
        "memory.training_runs.idle",
        "memory.trained_models.idle",
    ],
)
def test_each_figure_has_sane_values(document: dict, name: str) -> None:
    figure = document["figures"][name]
    assert len(figure["rounds"]) >= 1
    assert all(v is not None and v > 0 for v in figure["rounds"]), figure
    assert figure["min"] <= figure["median"] <= figure["max"]
    if "baseline" in figure:
        assert figure["baseline"] in document["figures"]
        ratio = figure["ratio"]["median"]
        assert ratio is not None and math.isfinite(ratio) and ratio > 0


def test_every_relayed_and_prepared_item_is_counted(document: dict) -> None:
    assert document["figures"]["dataset.images"]["median"] == document["plan"]["dataset_images"]


def test_goals_are_listed_with_a_verdict_or_none(document: dict) -> None:
    goals = document["goals"]
    assert len(goals) == 13
    # The fleet goals are judged at the fleet's full size only, never on the smoke plan's.
    fleet = [g for g in goals if g["goal"].startswith("Fleet")]
    assert len(fleet) == 2 and all(g["met"] is None for g in fleet)
    for goal in goals:
        assert goal["met"] in (True, False, None)
        assert (goal["value"] is None) == (goal["met"] is None)
