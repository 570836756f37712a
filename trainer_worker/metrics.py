"""The worker's series: its jobs and their GPUs, each run's training speed, and the GPUs.

Fed by what the worker already sees: the consumer's jobs, the pipeline's steps, and the
training child's progress events (trainer_worker.protocol), whose windows carry
mmengine's `time` and `data_time` of every iteration since the previous report. Per-run
series carry a `run` label and are removed when the job ends. GPU utilisation and memory
come from NVML (nvidia-ml-py, imported on the first scrape, never torch): without the
library or a driver there are no GPU series, and no error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.observability.metrics_server import MetricsServer
from trainer_worker.protocol import ChildEvent, EpochTrained, ProgressReported

log = structlog.get_logger(__name__)

_RUN = ("run",)
# Epochs last seconds (a smoke test) to hours.
_EPOCH_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
_PREPARATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class WorkerMetrics:
    def __init__(self, *, slots: int = 1, nvml: Collector | None = None) -> None:
        """`nvml`: the GPU collector (default `NvmlCollector()`)."""
        self.registry = r = CollectorRegistry()
        self.server = MetricsServer(r)
        Gauge("raven_worker_job_slots", "Jobs this worker trains at once.", registry=r).set(slots)
        self.jobs_running = Gauge(
            "raven_worker_jobs_running", "Jobs (training or evaluation) running.", registry=r
        )
        self.job_gpus = Gauge(
            "raven_worker_job_gpu",
            "1 for each GPU leased to a running job (gpu: its CUDA_VISIBLE_DEVICES entry, "
            "the UUID when nvidia-smi listed it).",
            ["run", "gpu"],
            registry=r,
        )
        self.iterations = Counter(
            "raven_worker_iterations_total", "Training iterations done.", registry=r
        )
        self.iteration_seconds = Counter(
            "raven_worker_iteration_seconds_total",
            "Sum of iteration times (mmengine's `time`: loading plus compute).",
            registry=r,
        )
        self.data_seconds = Counter(
            "raven_worker_data_loading_seconds_total",
            "Sum of the iterations' time waiting for their batch (mmengine's `data_time`).",
            registry=r,
        )
        self.images = Counter(
            "raven_worker_images_total", "Images trained on (all ranks).", registry=r
        )
        self.run_iteration = Gauge(
            "raven_worker_run_iteration_seconds",
            "The run's last iteration time (mmengine's `time`).",
            _RUN,
            registry=r,
        )
        self.run_data = Gauge(
            "raven_worker_run_data_loading_seconds",
            "The run's last iteration's data loading time (mmengine's `data_time`).",
            _RUN,
            registry=r,
        )
        self.run_compute = Gauge(
            "raven_worker_run_compute_seconds",
            "The run's last iteration time less its data loading time.",
            _RUN,
            registry=r,
        )
        self.run_data_ratio = Gauge(
            "raven_worker_run_data_loading_ratio",
            "Share of the run's iteration time spent loading data, since its previous report.",
            _RUN,
            registry=r,
        )
        self.run_images_per_second = Gauge(
            "raven_worker_run_images_per_second",
            "Images trained per second of iteration time, since the run's previous report.",
            _RUN,
            registry=r,
        )
        self.run_progress = Gauge(
            "raven_worker_run_progress_ratio",
            "Iterations done / the run's total.",
            _RUN,
            registry=r,
        )
        self.run_epoch = Gauge(
            "raven_worker_run_epoch_seconds", "The run's last epoch's duration.", _RUN, registry=r
        )
        self.epochs = Histogram(
            "raven_worker_epoch_seconds",
            "Durations of trained epochs.",
            buckets=_EPOCH_BUCKETS,
            registry=r,
        )
        self.preparation = Histogram(
            "raven_worker_dataset_preparation_seconds",
            "Time to prepare a job's dataset (read, check, split, write the split files).",
            buckets=_PREPARATION_BUCKETS,
            registry=r,
        )
        self._per_run = (
            self.run_iteration,
            self.run_data,
            self.run_compute,
            self.run_data_ratio,
            self.run_images_per_second,
            self.run_progress,
            self.run_epoch,
        )
        self._gpus: dict[str, tuple[str, ...]] = {}
        r.register(nvml if nvml is not None else NvmlCollector())

    @contextlib.contextmanager
    def job(self, run_id: str) -> Iterator[None]:
        """A job runs inside this; its per-run series go with it."""
        self.jobs_running.inc()
        try:
            yield
        finally:
            self.jobs_running.dec()
            self.released(run_id)
            for gauge in self._per_run:
                with contextlib.suppress(KeyError):
                    gauge.remove(run_id)

    def leased(self, run_id: str, gpus: Sequence[str]) -> None:
        self._gpus[run_id] = tuple(gpus)
        for gpu in gpus:
            self.job_gpus.labels(run_id, gpu).set(1)

    def released(self, run_id: str) -> None:
        for gpu in self._gpus.pop(run_id, ()):
            with contextlib.suppress(KeyError):
                self.job_gpus.remove(run_id, gpu)

    def dataset_prepared(self, seconds: float) -> None:
        self.preparation.observe(seconds)

    def child_event(self, run_id: str, event: ChildEvent) -> None:
        if isinstance(event, ProgressReported):
            self._progress(run_id, event)
        elif isinstance(event, EpochTrained) and event.duration_s is not None:
            self.epochs.observe(event.duration_s)
            self.run_epoch.labels(run_id).set(event.duration_s)

    def _progress(self, run_id: str, event: ProgressReported) -> None:
        if event.max_iters > 0:
            self.run_progress.labels(run_id).set(event.iter / event.max_iters)
        if event.iter_time_s is not None:
            self.run_iteration.labels(run_id).set(event.iter_time_s)
            if event.data_time_s is not None:
                self.run_data.labels(run_id).set(event.data_time_s)
                self.run_compute.labels(run_id).set(max(0.0, event.iter_time_s - event.data_time_s))
        if event.window_iters <= 0:
            return
        self.iterations.inc(event.window_iters)
        self.iteration_seconds.inc(max(0.0, event.window_time_s))
        self.data_seconds.inc(max(0.0, event.window_data_time_s))
        self.images.inc(max(0, event.window_images))
        if event.window_time_s > 0:
            self.run_data_ratio.labels(run_id).set(
                min(1.0, event.window_data_time_s / event.window_time_s)
            )
            if event.window_images > 0:
                self.run_images_per_second.labels(run_id).set(
                    event.window_images / event.window_time_s
                )


class NvmlCollector(Collector):
    """Utilisation and memory of every GPU NVML sees, read on scrape. The library is
    loaded on the first scrape; if it or the driver is missing, it collects nothing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Any]:
        # Nothing to check at registration: the first scrape loads NVML.
        return ()

    def collect(self) -> Iterable[Any]:
        nvml = self._load()
        if nvml is None:
            return []
        labels = ["gpu", "uuid", "name"]
        util = GaugeMetricFamily(
            "raven_worker_gpu_utilization_ratio",
            "Share of the last sample period the GPU was busy (NVML utilization.gpu / 100).",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "raven_worker_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        total = GaugeMetricFamily(
            "raven_worker_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
        )
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as error:
            log.warning("NVML cannot count the GPUs", error=str(error))
            return []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                values = [
                    str(index),
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                ]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError:
                continue
            used.add_metric(values, float(memory.used))
            total.add_metric(values, float(memory.total))
            # Not supported on every device (MIG instances): no sample, not an error.
            with contextlib.suppress(nvml.NVMLError):
                util.add_metric(values, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        return [util, used, total]

    def _load(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._nvml = _init_nvml()
            return self._nvml


def _init_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        log.info("no GPU metrics: nvidia-ml-py is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        log.info("no GPU metrics: NVML is not available", error=str(error))
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
