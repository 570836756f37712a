"""The bounds of every field a caller sends, in one table (docs/api-limits.md explains them).

`shared.request_guard` applies them to every request before a handler runs; the
handlers keep their domain rules (an existing dataset, a known architecture).
"""

from __future__ import annotations

from collections.abc import Mapping

PACKAGE = "raven.training.v1"

# Any string field not named below.
DEFAULT_STRING_MAX = 1024
# Any repeated field not named below.
DEFAULT_REPEATED_MAX = 1000

RESOURCE_NAME_MAX = 128
DISPLAY_NAME_MAX = 200
DESCRIPTION_MAX = 10_000
REASON_MAX = 2000
URI_MAX = 2048
# SPIFFE ids are at most 2048 bytes.
IDENTITY_MAX = 2048
ETAG_MAX = 128
PAGE_TOKEN_MAX = 1024
REQUEST_ID_MAX = 64
ARCHITECTURE_MAX = 64
CLASS_NAME_MAX = 256
CLASSES_MAX = 1000
CHANNEL_MAX = 63

LABELS_MAX = 64
LABEL_KEY_MAX = 63
LABEL_VALUE_MAX = 256

# Error messages quote at most this much of a bad value.
QUOTE_MAX = 64

_NAME = RESOURCE_NAME_MAX

# message (without the package) -> field -> most characters (strings) or entries (repeated).
_BOUNDS: Mapping[str, Mapping[str, int]] = {
    "TrainingRun": {
        "name": _NAME,
        "display_name": DISPLAY_NAME_MAX,
        "base_model": _NAME,
        "etag": ETAG_MAX,
    },
    "TrainingSpec": {
        "dataset_uri": URI_MAX,
        "image_root": URI_MAX,
        "architecture": ARCHITECTURE_MAX,
    },
    "CreateTrainingRunRequest": {"request_id": REQUEST_ID_MAX},
    "GetTrainingRunRequest": {"name": _NAME},
    "ListTrainingRunsRequest": {
        "page_token": PAGE_TOKEN_MAX,
        "states": 16,
        "base_model": _NAME,
        "dataset_uri": URI_MAX,
        "creator": IDENTITY_MAX,
        "order_by": 64,
        "kinds": 4,
    },
    "CancelTrainingRunRequest": {"name": _NAME, "reason": REASON_MAX},
    "DeleteTrainingRunRequest": {"name": _NAME, "etag": ETAG_MAX},
    "RetryTrainingRunRequest": {"name": _NAME, "request_id": REQUEST_ID_MAX},
    "ListTrainingRunEventsRequest": {"name": _NAME, "page_token": PAGE_TOKEN_MAX},
    "GetTrainingRunMetricsRequest": {"name": _NAME},
    "WatchTrainingRunRequest": {"name": _NAME},
    "TrainedModel": {
        "name": _NAME,
        "display_name": DISPLAY_NAME_MAX,
        "description": DESCRIPTION_MAX,
        "etag": ETAG_MAX,
    },
    "GetTrainedModelRequest": {"name": _NAME},
    "ListTrainedModelsRequest": {
        "page_token": PAGE_TOKEN_MAX,
        "base_model": _NAME,
        "dataset_uri": URI_MAX,
        "architecture": ARCHITECTURE_MAX,
        "class_name": CLASS_NAME_MAX,
        "creator": IDENTITY_MAX,
        "order_by": 64,
        "training_run": _NAME,
    },
    "ImportTrainedModelRequest.Metadata": {
        "display_name": DISPLAY_NAME_MAX,
        "description": DESCRIPTION_MAX,
        "architecture": ARCHITECTURE_MAX,
        "classes": CLASSES_MAX,
        "config_uri": URI_MAX,
        "checkpoint_uri": URI_MAX,
        "request_id": REQUEST_ID_MAX,
    },
    "PublishTrainedModelRequest": {
        "name": _NAME,
        "channel": CHANNEL_MAX,
        "reason": REASON_MAX,
        "etag": ETAG_MAX,
        "evaluation_split": 32,
        "incumbent_metric": 128,
    },
    "UnpublishTrainedModelRequest": {"name": _NAME, "reason": REASON_MAX, "etag": ETAG_MAX},
    "ListPublicationEventsRequest": {
        "trained_model": _NAME,
        "channel": CHANNEL_MAX,
        "page_token": PAGE_TOKEN_MAX,
    },
    "GetTrainedModelLineageRequest": {"name": _NAME},
    "DownloadTrainedModelRequest": {"name": _NAME, "artifact_kind": 32},
    "DeleteTrainedModelRequest": {"name": _NAME, "etag": ETAG_MAX},
    "EvaluateTrainedModelRequest": {
        "trained_model": _NAME,
        "dataset_uri": URI_MAX,
        "image_root": URI_MAX,
        "split_of": _NAME,
        "split": 16,
        "request_id": REQUEST_ID_MAX,
    },
    "GetModelEvaluationRequest": {"name": _NAME},
    "ListModelEvaluationsRequest": {
        "trained_model": _NAME,
        "dataset_fingerprint": 128,
        "split": 16,
        "states": 16,
        "page_token": PAGE_TOKEN_MAX,
    },
    "CancelModelEvaluationRequest": {"name": _NAME, "reason": REASON_MAX},
    "CompareTrainedModelsRequest": {
        "trained_models": 20,
        "dataset_fingerprint": 128,
        "split": 16,
    },
    "DownloadArtifactRequest": {"parent": _NAME, "artifact": 256},
    "ListAuditRecordsRequest": {
        "page_token": PAGE_TOKEN_MAX,
        "identity": IDENTITY_MAX,
        "rpc": 256,
        "outcome": 64,
        "resource": 256,
    },
}

# Element strings of repeated fields, where they differ from the default.
_ITEM_BOUNDS: Mapping[str, Mapping[str, int]] = {
    "ImportTrainedModelRequest.Metadata": {"classes": CLASS_NAME_MAX},
    "CompareTrainedModelsRequest": {"trained_models": _NAME},
}

# Fields of a resource that requests carry but the server never reads (it sets them):
# a resource read and sent back unchanged is never refused for them.
_OUTPUT_ONLY: Mapping[str, frozenset[str]] = {
    "TrainingRun": frozenset(
        {
            "state",
            "trained_model",
            "progress",
            "latest_evaluation",
            "dataset",
            "failure",
            "attempt",
            "creator",
            "create_time",
            "update_time",
            "start_time",
            "end_time",
            "artifacts",
            "facts",
            "best_evaluation",
            "retry_of",
            "test_evaluation",
            "kind",
            "model_evaluation",
        }
    ),
    "TrainedModel": frozenset(
        {
            "training_run",
            "base_model",
            "dataset_uri",
            "dataset_fingerprint",
            "architecture",
            "classes",
            "artifacts",
            "evaluation",
            "facts",
            "publication",
            "creator",
            "create_time",
            "update_time",
            "val_evaluation",
        }
    ),
}


def _short(full_name: str) -> str:
    return full_name.removeprefix(PACKAGE + ".")


def bound(message_full_name: str, field: str, *, default: int) -> int:
    return _BOUNDS.get(_short(message_full_name), {}).get(field, default)


def item_bound(message_full_name: str, field: str) -> int:
    return _ITEM_BOUNDS.get(_short(message_full_name), {}).get(field, DEFAULT_STRING_MAX)


def output_only(message_full_name: str) -> frozenset[str]:
    return _OUTPUT_ONLY.get(_short(message_full_name), frozenset())


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """`repr` of at most `limit` characters of `value`, marked when cut: error messages
    say which value was wrong without echoing a huge one back."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def label_problems(labels: Mapping[str, str]) -> list[str]:
    """What is wrong with a set of labels (the rules of runs and models alike)."""
    problems = []
    if len(labels) > LABELS_MAX:
        problems.append(f"at most {LABELS_MAX} labels, got {len(labels)}")
    for key, value in labels.items():
        if not (0 < len(key) <= LABEL_KEY_MAX and key.isascii() and key.isprintable()):
            problems.append(f"key {quote(key)}: 1 to {LABEL_KEY_MAX} printable ASCII characters")
        if len(value) > LABEL_VALUE_MAX:
            problems.append(f"value of {quote(key)}: at most {LABEL_VALUE_MAX} characters")
        elif "\x00" in value:
            problems.append(f"value of {quote(key)}: must not contain NUL characters")
        if len(problems) >= 3:
            break
    return problems
