"""Permission names, and the one table saying which permission each RPC needs.

Permissions are compared as whole strings (never substrings or prefixes).
An RPC missing from `RULES` is denied; only the services in `OPEN_SERVICES`
are reachable without a permission (still over mTLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    TRAINING_RUNS_READ = "training_runs.read"
    TRAINING_RUNS_CREATE = "training_runs.create"
    TRAINING_RUNS_UPDATE = "training_runs.update"
    TRAINING_RUNS_CANCEL = "training_runs.cancel"
    TRAINING_RUNS_DELETE = "training_runs.delete"
    TRAINING_RUNS_METRICS_READ = "training_runs.metrics.read"
    TRAINED_MODELS_READ = "trained_models.read"
    TRAINED_MODELS_UPDATE = "trained_models.update"
    TRAINED_MODELS_PUBLISH = "trained_models.publish"
    TRAINED_MODELS_IMPORT = "trained_models.import"
    TRAINED_MODELS_DELETE = "trained_models.delete"
    TRAINED_MODELS_DOWNLOAD = "trained_models.download"
    # Starting and cancelling model evaluations: jobs on the workers, as training runs are.
    TRAINED_MODELS_EVALUATE = "trained_models.evaluate"
    ADMIN = "admin"


OWN_SUFFIX = ".own"

# A permission with OWN_SUFFIX grants the RPC for resources the caller created
# only; it exists for the RPCs marked `ownable`, whose servicer enforces it.
KNOWN_PERMISSIONS = frozenset(
    {p.value for p in Permission}
    | {Permission.TRAINING_RUNS_READ.value + OWN_SUFFIX}
    | {Permission.TRAINED_MODELS_READ.value + OWN_SUFFIX}
)


@dataclass(frozen=True, slots=True)
class Rule:
    permission: Permission
    # State-changing: every call is audited, whatever its outcome.
    mutates: bool = False
    # `<permission>.own` is enough, with results scoped to what the caller created.
    ownable: bool = False


_RUNS = "/raven.training.v1.TrainingRunService/"
_MODELS = "/raven.training.v1.TrainedModelService/"
_AUDIT = "/raven.training.v1.AuditService/"

P = Permission

# Reading a run or a model: also granted, for the caller's own, by `<read>.own`.
_READ_RUN = Rule(P.TRAINING_RUNS_READ, ownable=True)
_READ_MODEL = Rule(P.TRAINED_MODELS_READ, ownable=True)
RULES: dict[str, Rule] = {
    _RUNS + "CreateTrainingRun": Rule(P.TRAINING_RUNS_CREATE, mutates=True),
    _RUNS + "GetTrainingRun": _READ_RUN,
    _RUNS + "ListTrainingRuns": _READ_RUN,
    _RUNS + "UpdateTrainingRun": Rule(P.TRAINING_RUNS_UPDATE, mutates=True),
    _RUNS + "CancelTrainingRun": Rule(P.TRAINING_RUNS_CANCEL, mutates=True),
    _RUNS + "DeleteTrainingRun": Rule(P.TRAINING_RUNS_DELETE, mutates=True),
    # A retry creates a new run from an old one's spec.
    _RUNS + "RetryTrainingRun": Rule(P.TRAINING_RUNS_CREATE, mutates=True),
    _RUNS + "ListTrainingRunEvents": _READ_RUN,
    _RUNS + "GetTrainingRunMetrics": Rule(P.TRAINING_RUNS_METRICS_READ),
    _RUNS + "WatchTrainingRun": _READ_RUN,
    # The architectures and spec defaults a create may use: needed by whoever reads runs.
    _RUNS + "ListArchitectures": Rule(P.TRAINING_RUNS_READ),
    _MODELS + "GetTrainedModel": _READ_MODEL,
    _MODELS + "ListTrainedModels": _READ_MODEL,
    _MODELS + "UpdateTrainedModel": Rule(P.TRAINED_MODELS_UPDATE, mutates=True),
    _MODELS + "ImportTrainedModel": Rule(P.TRAINED_MODELS_IMPORT, mutates=True),
    _MODELS + "PublishTrainedModel": Rule(P.TRAINED_MODELS_PUBLISH, mutates=True),
    _MODELS + "UnpublishTrainedModel": Rule(P.TRAINED_MODELS_PUBLISH, mutates=True),
    _MODELS + "ListPublicationEvents": _READ_MODEL,
    _MODELS + "GetTrainedModelLineage": _READ_MODEL,
    _MODELS + "DownloadTrainedModel": Rule(P.TRAINED_MODELS_DOWNLOAD),
    _MODELS + "DeleteTrainedModel": Rule(P.TRAINED_MODELS_DELETE, mutates=True),
    # An evaluation is a job of the model's: starting or cancelling one takes its own
    # permission; reading evaluations and comparing them is reading the models (own ones
    # only, with `trained_models.read.own`).
    _MODELS + "EvaluateTrainedModel": Rule(P.TRAINED_MODELS_EVALUATE, mutates=True),
    _MODELS + "CancelModelEvaluation": Rule(P.TRAINED_MODELS_EVALUATE, mutates=True),
    _MODELS + "GetModelEvaluation": _READ_MODEL,
    _MODELS + "ListModelEvaluations": _READ_MODEL,
    _MODELS + "CompareTrainedModels": _READ_MODEL,
    # The files of models, runs and evaluations, as DownloadTrainedModel; a caller that
    # may read only its own models or runs is limited to those (READ_RULES).
    _MODELS + "DownloadArtifact": Rule(P.TRAINED_MODELS_DOWNLOAD),
    _AUDIT + "ListAuditRecords": Rule(P.ADMIN),
}

# Probes and schema discovery: open to any peer that completed the mTLS handshake.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


# The collections whose resources have a creator, and the permission to read them. A
# caller that may read only its own resources of a collection (`<read>.own`) is limited
# to them in every call that names one, whatever that call's own permission: another's
# resource is reported missing. Enforced by shared.identity.require_visible.
READ_RULES: dict[str, Rule] = {
    "trainingRuns": _READ_RUN,
    "trainedModels": _READ_MODEL,
}


def service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").split("/", 1)[0]


class Level(StrEnum):
    ALL = "all"
    OWN = "own"


def level(granted: frozenset[str], rule: Rule) -> Level | None:
    """How far `granted` covers `rule`: everything, only the caller's own resources, or not."""
    if Permission.ADMIN in granted or rule.permission in granted:
        return Level.ALL
    if rule.ownable and rule.permission + OWN_SUFFIX in granted:
        return Level.OWN
    return None
