"""The TrainingRun aggregate and its state machine: pure Python.

states       the states and the transitions allowed between them
events       the entries of a run's history and their payloads
record       what a run holds, and what a worker reports while its state stays
run          TrainingRun: the transitions
claims       the decision on a worker's claim of a job
evaluation   the model evaluation a job of kind EVALUATION runs
checkpoints  the stored checkpoints and the per-epoch series of a running run

The payload values (progress, evaluations, dataset summary, artifacts) are
shared.payloads', the worker's reports shared.reports'.
"""

from services.training_runs.domain.checkpoints import RESUME_CHECKPOINT
from services.training_runs.domain.claims import ClaimDecision, ClaimRefusal
from services.training_runs.domain.evaluation import EvaluationRecord, RunKind
from services.training_runs.domain.events import EventKind, RunEvent, StateChange
from services.training_runs.domain.record import TEST_SPLIT, Failure
from services.training_runs.domain.run import TrainingRun
from services.training_runs.domain.states import SYSTEM, TERMINAL, IllegalTransition, RunState

__all__ = [
    "RESUME_CHECKPOINT",
    "SYSTEM",
    "TERMINAL",
    "TEST_SPLIT",
    "ClaimDecision",
    "ClaimRefusal",
    "EvaluationRecord",
    "EventKind",
    "Failure",
    "IllegalTransition",
    "RunEvent",
    "RunKind",
    "RunState",
    "StateChange",
    "TrainingRun",
]
