"""Python client of the Raven training backbone (TrainingRunService, TrainedModelService).

    from raven_client import RavenClient, Tls, TrainingSpec

The generated messages and stubs are in `raven_client.pb` (training_run_pb2,
trained_model_pb2, common_pb2, and their *_pb2_grpc).
"""

from raven_client.channel import Tls, open_channel
from raven_client.client import (
    ModelEvaluation,
    RavenClient,
    TrainedModel,
    TrainingRun,
    TrainingSpec,
)
from raven_client.diagnose import Diagnosis, Problem, diagnose, probe
from raven_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ChecksumMismatch,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RavenError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from raven_client.retry import NO_RETRIES, RetryPolicy

__all__ = [
    "NO_RETRIES",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ChecksumMismatch",
    "DeadlineExceeded",
    "Diagnosis",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "ModelEvaluation",
    "NotFound",
    "PermissionDenied",
    "Problem",
    "RavenClient",
    "RavenError",
    "ResourceExhausted",
    "RetryPolicy",
    "Tls",
    "TrainedModel",
    "TrainingRun",
    "TrainingSpec",
    "Unauthenticated",
    "Unavailable",
    "diagnose",
    "from_rpc_error",
    "open_channel",
    "probe",
]
