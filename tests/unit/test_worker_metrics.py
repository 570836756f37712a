"""The worker's registry fed by the training child's progress events (as the relay hands
them over, decoded from the event lines), served over HTTP; and the path without NVML."""

from __future__ import annotations

import asyncio
import sys
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainer_worker.metrics import NvmlCollector, WorkerMetrics
from trainer_worker.protocol import EpochTrained, ProgressReported, decode, encode

RUN = "0b7c0d8e-run"


class _NoGpus:
    """A GPU collector that finds none (what NvmlCollector is without a driver)."""

    def collect(self) -> list[object]:
        return []


def samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def progress(iteration: int, **fields: float) -> ProgressReported:
    """A progress line as the child writes it, decoded as the parent reads it."""
    event = ProgressReported(
        epoch=1, max_epochs=2, iter=iteration, max_iters=40, loss=1.0, **fields
    )
    decoded = decode(encode(event))
    assert isinstance(decoded, ProgressReported)
    return decoded


def test_progress_windows_become_speed_and_loading_share() -> None:
    metrics = WorkerMetrics(slots=2, nvml=_NoGpus())
    with metrics.job(RUN):
        metrics.leased(RUN, ["GPU-aaaa"])
        metrics.child_event(
            RUN,
            progress(
                10,
                iter_time_s=0.5,
                data_time_s=0.2,
                window_iters=10,
                window_time_s=5.0,
                window_data_time_s=1.0,
                window_images=80,
            ),
        )
        epoch = decode(encode(EpochTrained(epoch=1, losses={"loss": 1.0}, duration_s=42.0)))
        metrics.child_event(RUN, epoch)
        during = samples(generate_latest(metrics.registry))
    after = samples(generate_latest(metrics.registry))

    run = frozenset({("run", RUN)})
    assert during[("raven_worker_jobs_running", frozenset())] == 1
    assert during[("raven_worker_job_slots", frozenset())] == 2
    assert during[("raven_worker_job_gpu", frozenset({("run", RUN), ("gpu", "GPU-aaaa")}))] == 1
    assert during[("raven_worker_iterations_total", frozenset())] == 10
    assert during[("raven_worker_iteration_seconds_total", frozenset())] == 5.0
    assert during[("raven_worker_data_loading_seconds_total", frozenset())] == 1.0
    assert during[("raven_worker_images_total", frozenset())] == 80
    assert during[("raven_worker_run_images_per_second", run)] == 16.0
    assert during[("raven_worker_run_data_loading_ratio", run)] == 0.2
    assert during[("raven_worker_run_iteration_seconds", run)] == 0.5
    assert during[("raven_worker_run_data_loading_seconds", run)] == 0.2
    assert during[("raven_worker_run_compute_seconds", run)] == pytest.approx(0.3)
    assert during[("raven_worker_run_progress_ratio", run)] == 0.25
    assert during[("raven_worker_run_epoch_seconds", run)] == 42.0
    assert during[("raven_worker_epoch_seconds_bucket", frozenset({("le", "60.0")}))] == 1
    assert during[("raven_worker_epoch_seconds_bucket", frozenset({("le", "30.0")}))] == 0

    # The job ended: its series went with it; the worker's totals stay.
    assert after[("raven_worker_jobs_running", frozenset())] == 0
    assert not [key for key in after if ("run", RUN) in key[1]]
    assert after[("raven_worker_iterations_total", frozenset())] == 10


def test_a_report_without_a_window_adds_nothing() -> None:
    """The report repeated at an epoch's end carries no new iterations."""
    metrics = WorkerMetrics(nvml=_NoGpus())
    with metrics.job(RUN):
        metrics.child_event(RUN, progress(5, iter_time_s=0.4, data_time_s=0.1))
        found = samples(generate_latest(metrics.registry))
    assert found[("raven_worker_iterations_total", frozenset())] == 0
    assert ("raven_worker_run_images_per_second", frozenset({("run", RUN)})) not in found
    assert found[("raven_worker_run_iteration_seconds", frozenset({("run", RUN)}))] == 0.4


def test_old_progress_lines_without_timings_still_decode() -> None:
    line = b'{"kind": "progress", "epoch": 1, "max_epochs": 1, "iter": 1, "max_iters": 2, "loss": null}'
    event = decode(line)
    assert isinstance(event, ProgressReported) and event.window_iters == 0
    WorkerMetrics(nvml=_NoGpus()).child_event(RUN, event)


def test_without_nvml_there_are_no_gpu_series_and_no_error(monkeypatch) -> None:
    # The library absent: importing it fails.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    metrics = WorkerMetrics()
    body = generate_latest(metrics.registry).decode()
    assert "raven_worker_gpu_" not in body
    assert "raven_worker_jobs_running" in body


def test_nvml_without_a_driver_collects_nothing() -> None:
    """Where the library is installed but no NVIDIA driver answers (this machine unless it
    has a GPU), the collector is empty; with a GPU it reports each one's memory."""
    families = list(NvmlCollector().collect())
    for family in families:
        for sample in family.samples:
            assert sample.labels["uuid"]
    if families:
        assert any(f.name == "raven_worker_gpu_memory_total_bytes" for f in families)


async def test_the_worker_serves_its_registry_over_http() -> None:
    metrics = WorkerMetrics(nvml=_NoGpus())
    port = await metrics.server.start("127.0.0.1:0")
    try:

        def fetch(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as error:
                return error.code, b""

        status, body = await asyncio.to_thread(fetch, "/metrics")
        assert status == 200 and b"raven_worker_jobs_running 0.0" in body
        assert (await asyncio.to_thread(fetch, "/other"))[0] == 404
    finally:
        await metrics.server.stop()
