"""Use cases of TrainingRunService: each takes a unit of work, asks the domain,
and commits once.

creation   CreateTrainingRun and the checks of its request
lifecycle  reading runs; update, cancel, delete, retry
reports    workers' job claims and the reports they send while a job runs
recovery   runs whose worker went silent
"""

from services.training_runs.handlers.common import Clock, utcnow
from services.training_runs.handlers.creation import CreateRun, create_run
from services.training_runs.handlers.lifecycle import (
    cancel_run,
    delete_run,
    get_run,
    list_events,
    retry_run,
    update_run,
)
from services.training_runs.handlers.recovery import recover_lost_runs, recover_lost_runs_forever
from services.training_runs.handlers.reports import (
    WORKER_EVENTS_CONSUMER,
    WorkerReport,
    apply_progress_reports,
    apply_worker_report,
    claim_job,
)

__all__ = [
    "WORKER_EVENTS_CONSUMER",
    "Clock",
    "CreateRun",
    "WorkerReport",
    "apply_progress_reports",
    "apply_worker_report",
    "cancel_run",
    "claim_job",
    "create_run",
    "delete_run",
    "get_run",
    "list_events",
    "recover_lost_runs",
    "recover_lost_runs_forever",
    "retry_run",
    "update_run",
    "utcnow",
]
