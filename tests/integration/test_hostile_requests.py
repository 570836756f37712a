"""Malformed requests through the public gRPC API of both services.

Every RPC gets bad values in its fields (empty, huge, NUL, unicode, traversal, wrong
resource shapes, non-finite and negative numbers, unknown enums, edited tokens and
etags, unknown mask paths) and bytes that do not parse. Each answer must be a status
the caller can act on (never UNKNOWN or INTERNAL), come within its deadline, say
nothing about how the server is built, and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from shared import pagination
from shared.proto.raven.training.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    trained_model_pb2,
    training_run_pb2,
)
from tests.support import create_request, eventually, violations

pytestmark = pytest.mark.timeout(90)

pb = training_run_pb2
mpb = trained_model_pb2
Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 10.0

NUL = "a\x00b"
# Far past every bound, and past what a status could carry back in its metadata (16 KiB).
HUGE = "x" * 100_000
UNICODE = "Zürich 名前 🚀 \u202e\ufeff"
TRAVERSAL = "../../../../etc/passwd"
ABSOLUTE = "file:///etc/passwd"
MISSING = str(uuid.uuid4())
BAD_RUN_NAMES = [
    "",
    "trainingRuns/",
    "trainingRuns/not-a-uuid",
    f"trainedModels/{MISSING}",
    f"trainingRuns/{MISSING}/events",
    "trainingRuns/" + NUL,
    "trainingRuns/" + HUGE,
    UNICODE,
    TRAVERSAL,
]
BAD_MODEL_NAMES = [n.replace("trainingRuns", "trainedModels") for n in BAD_RUN_NAMES] + [
    f"trainingRuns/{MISSING}"
]
BAD_LABELS: list[dict[str, str]] = [
    {"": "v"},
    {"k" * 64: "v"},
    {"k": "v" * 257},
    {HUGE: "v"},
    {"k": HUGE},
    {"k": NUL},
    {NUL: "v"},
    {"ключ": "v"},
    {f"k{i}": "v" for i in range(65)},
]
# Refusals of these are audited with the name they carry; names with NUL characters in
# audit records are the audit's own tests (tests/integration/test_auth.py).
STATE_CHANGING = {"cancel", "delete", "retry", "update", "publish", "unpublish"}
# What must never reach a caller.
_CLASS_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")
REFUSED_ANYWAY = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ABORTED}


def internals(settings: Any) -> list[str]:
    return [str(ROOT), str(Path(settings.artifact_root).resolve()), sys.prefix, "Traceback"]


def texts(error: grpc.aio.AioRpcError) -> str:
    """The message and every field violation a caller reads."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found = violations(error) if status is not None else {}
    return "\n".join([error.details() or "", *found, *found.values()])


class Battery:
    """Sends each request and checks its answer; counts what it sent."""

    def __init__(self, settings: Any) -> None:
        self.forbidden = internals(settings)
        self.sent = 0

    def check(self, label: str, error: grpc.aio.AioRpcError, expected: set[Code]) -> None:
        code = error.code()
        assert code not in (Code.UNKNOWN, Code.INTERNAL, Code.DEADLINE_EXCEEDED), (
            label,
            code,
            (error.details() or "")[:200],
        )
        assert code in expected, (label, code, (error.details() or "")[:200])
        text = texts(error)
        assert len(text) < 8192, (label, len(text))
        for secret in self.forbidden:
            assert secret not in text, (label, secret, text[:300])
        assert not _CLASS_NAME.search(text), (label, text[:300])
        assert "<class" not in text, (label, text[:300])

    async def refused_naming(
        self,
        name: str,
        calls: Iterable[tuple[str, Callable[..., Any], Any]],
        stream: tuple[str, Callable[..., Any], Any],
        *,
        prefix: str = "",
    ) -> None:
        """Each of `calls` and the streaming call `stream`, all naming `name`, is refused;
        state-changing calls only where `name` holds no NUL (audited: test_auth.py)."""
        for label, call, request in calls:
            if label in STATE_CHANGING and "\x00" in name:
                continue
            await self.refused(f"{prefix}{label} {name[:40]!r}", call, request, REFUSED_ANYWAY)
        label, call, request = stream
        await self.refused(f"{label} {name[:40]!r}", call, request, REFUSED_ANYWAY, streaming=True)

    async def refused(
        self,
        label: str,
        call: Callable[..., Any],
        request: Any,
        expected: set[Code] | Code = Code.INVALID_ARGUMENT,
        *,
        field: str | None = None,
        streaming: bool = False,
    ) -> grpc.aio.AioRpcError:
        expected = {expected} if isinstance(expected, Code) else expected
        self.sent += 1
        try:
            if streaming:
                async for _ in call(request, timeout=DEADLINE_S):
                    pass
            else:
                await call(request, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            self.check(label, error, expected)
            if field is not None:
                named = violations(error)
                assert any(f == field or f.startswith(field + ".") for f in named), (
                    label,
                    field,
                    named,
                )
            return error
        raise AssertionError(f"{label}: accepted")


def run_request(**fields: Any) -> pb.CreateTrainingRunRequest:
    return pb.CreateTrainingRunRequest(
        training_run=pb.TrainingRun(**fields), request_id=str(uuid.uuid4())
    )


def spec_request(dataset_uri: str, **spec: Any) -> pb.CreateTrainingRunRequest:
    request = create_request(dataset_uri)
    for key, value in spec.items():
        setattr(request.training_run.spec, key, value)
    return request


async def count_all(list_rpc: Callable[[Any], Awaitable[Any]], request: Any, items: str) -> int:
    """How many `items` all the pages of a List RPC hold; `request` is its request type."""
    total, token = 0, ""
    while True:
        page = await list_rpc(request(page_size=1000, page_token=token))
        total += len(getattr(page, items))
        token = page.next_page_token
        if not token:
            return total


async def count_runs(runs: Any) -> int:
    return await count_all(runs.ListTrainingRuns, pb.ListTrainingRunsRequest, "training_runs")


async def count_models(models: Any) -> int:
    return await count_all(models.ListTrainedModels, mpb.ListTrainedModelsRequest, "trained_models")


def tampered(token: str) -> list[str]:
    """Edits of a real token: its cursor rewritten (id not a UUID, value of another type),
    its signature cut or changed, and no signature at all."""
    payload, _, signature = token.partition(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edits = []
    for change in ({"id": "1' OR '1'='1"}, {"v": 1.5}, {"v": "x"}, {"q": "0" * 16}):
        raw = json.dumps({**data, **change}).encode()
        edits.append(base64.urlsafe_b64encode(raw).decode().rstrip("=") + "." + signature)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return [*edits, f"{payload}.{flipped}", payload, f"{payload}.", "%%%", HUGE, NUL]


async def test_every_rpc_refuses_malformed_fields_with_a_status_a_caller_can_act_on(
    runs, models, runs_channel, settings, dataset_uri, js, subjects
):
    battery = Battery(settings)
    audit = audit_pb2_grpc.AuditServiceStub(runs_channel)
    # Two valid runs: one to aim edits at, and a real page token to tamper with.
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    await runs.CreateTrainingRun(create_request(dataset_uri))
    token = (await runs.ListTrainingRuns(pb.ListTrainingRunsRequest(page_size=1))).next_page_token
    assert token
    runs_before, models_before = await count_runs(runs), await count_models(models)

    # CreateTrainingRun: every field the caller sets.
    create = runs.CreateTrainingRun
    for value in (NUL, HUGE, "", "   "):
        await battery.refused(
            "display_name",
            create,
            run_request(
                display_name=value,
                spec=pb.TrainingSpec(dataset_uri=dataset_uri, architecture="retinanet_r18_fpn"),
            ),
            field="training_run.display_name",
        )
    for labels in BAD_LABELS:
        request = create_request(dataset_uri)
        request.training_run.labels.update(labels)
        await battery.refused("labels", create, request, field="training_run.labels")
    for uri in (
        NUL,
        HUGE,
        "",
        TRAVERSAL,
        ABSOLUTE,
        "s3://",
        "file://relative/a.json",
        "ftp://host/a.json",
        UNICODE,
        "datasets/" + UNICODE + ".json",
        "datasets/" + "n" * 300 + "/a.json",
    ):
        await battery.refused(
            "dataset_uri", create, create_request(uri), field="training_run.spec.dataset_uri"
        )
    for root in (NUL, HUGE, "ftp://host/images", "x" * 2049):
        await battery.refused(
            "image_root",
            create,
            spec_request(dataset_uri, image_root=root),
            field="training_run.spec.image_root",
        )
    for architecture in (NUL, HUGE, UNICODE, "yolo_v99"):
        await battery.refused(
            "architecture",
            create,
            spec_request(dataset_uri, architecture=architecture),
            field="training_run.spec.architecture",
        )
    numbers = {
        "device": [99, -5],
        "optimizer": [-1, 7],
        "epochs": [-1, 0, 2**31 - 1],
        "batch_size": [-3, 10**9],
        "learning_rate": [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e308],
        "val_fraction": [float("nan"), -0.1, 1.5],
        "test_fraction": [float("inf"), -0.2],
        "frozen_stages": [-2, 99],
        "image_size": [-640, 2**31 - 1],
        "seed": [-1],
        "gpu_count": [-1, 1000],
        "warmup_iterations": [-1],
        "val_interval": [-1, 0],
        "early_stopping_patience": [-1],
    }
    for field, values in numbers.items():
        for value in values:
            await battery.refused(
                f"spec.{field}={value}",
                create,
                spec_request(dataset_uri, **{field: value}),
                field=f"training_run.spec.{field}",
            )
    for base in BAD_MODEL_NAMES[1:]:  # empty: no base model
        request = create_request(dataset_uri)
        request.training_run.base_model = base
        await battery.refused(
            "base_model", create, request, {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
        )
    for request_id in (NUL, HUGE, "not-a-uuid", UNICODE):
        request = create_request(dataset_uri)
        request.request_id = request_id
        await battery.refused("request_id", create, request)

    # The RPCs that name a run.
    for name in BAD_RUN_NAMES:
        calls = (
            ("get", runs.GetTrainingRun, pb.GetTrainingRunRequest(name=name)),
            ("cancel", runs.CancelTrainingRun, pb.CancelTrainingRunRequest(name=name)),
            ("delete", runs.DeleteTrainingRun, pb.DeleteTrainingRunRequest(name=name)),
            ("retry", runs.RetryTrainingRun, pb.RetryTrainingRunRequest(name=name)),
            ("events", runs.ListTrainingRunEvents, pb.ListTrainingRunEventsRequest(name=name)),
            ("metrics", runs.GetTrainingRunMetrics, pb.GetTrainingRunMetricsRequest(name=name)),
            (
                "update",
                runs.UpdateTrainingRun,
                pb.UpdateTrainingRunRequest(
                    training_run=pb.TrainingRun(name=name, display_name="x"),
                    update_mask=FieldMask(paths=["display_name"]),
                ),
            ),
        )
        watch = ("watch", runs.WatchTrainingRun, pb.WatchTrainingRunRequest(name=name))
        await battery.refused_naming(name, calls, watch)
    await battery.refused(
        "watch after -1",
        runs.WatchTrainingRun,
        pb.WatchTrainingRunRequest(name=run.name, after_sequence=-1),
        streaming=True,
        field="after_sequence",
    )
    for reason in (NUL, HUGE):
        await battery.refused(
            "cancel reason",
            runs.CancelTrainingRun,
            pb.CancelTrainingRunRequest(name=run.name, reason=reason),
            field="reason",
        )
    for request_id in (NUL, HUGE, "not-a-uuid"):
        await battery.refused(
            "retry request_id",
            runs.RetryTrainingRun,
            pb.RetryTrainingRunRequest(name=run.name, request_id=request_id),
            REFUSED_ANYWAY,
        )

    # UpdateTrainingRun: masks, labels, etags.
    def update(mask: Iterable[str], **fields: Any) -> pb.UpdateTrainingRunRequest:
        return pb.UpdateTrainingRunRequest(
            training_run=pb.TrainingRun(name=run.name, **fields), update_mask=FieldMask(paths=mask)
        )

    for mask in ([], ["state"], ["spec.epochs"], ["creator"], [NUL], [HUGE], ["labels", "etag"]):
        await battery.refused(
            "mask", runs.UpdateTrainingRun, update(mask, display_name="x"), field="update_mask"
        )
    for labels in [*BAD_LABELS, {f"k{i}": "v" for i in range(10_000)}]:
        await battery.refused(
            "update labels",
            runs.UpdateTrainingRun,
            update(["labels"], labels=labels),
            field="training_run.labels",
        )
    for display_name in (NUL, HUGE, ""):
        await battery.refused(
            "update display_name",
            runs.UpdateTrainingRun,
            update(["display_name"], display_name=display_name),
            field="training_run.display_name",
        )
    stale = run.etag[:-1] + ("0" if run.etag[-1] != "0" else "1")
    for etag in (stale, "W/" + run.etag, UNICODE):
        error = await battery.refused(
            "update etag",
            runs.UpdateTrainingRun,
            update(["display_name"], display_name="renamed", etag=etag),
            Code.ABORTED,
        )
        assert run.etag not in texts(error)
    for etag in (NUL, HUGE):
        await battery.refused(
            "update etag",
            runs.UpdateTrainingRun,
            update(["display_name"], display_name="renamed", etag=etag),
            field="training_run.etag",
        )
    for etag in (stale, NUL, HUGE):
        error = await battery.refused(
            "delete etag",
            runs.DeleteTrainingRun,
            pb.DeleteTrainingRunRequest(name=run.name, etag=etag),
            REFUSED_ANYWAY,
        )
        assert run.etag not in texts(error)

    # ListTrainingRuns and ListTrainingRunEvents: filters, orders, sizes and tokens.
    list_runs = runs.ListTrainingRuns
    for label, request, field in (
        ("states 99", pb.ListTrainingRunsRequest(states=[99]), "states"),
        ("states -1", pb.ListTrainingRunsRequest(states=[1, -1]), "states"),
        ("states many", pb.ListTrainingRunsRequest(states=[1] * 100), "states"),
        ("page_size", pb.ListTrainingRunsRequest(page_size=-1), "page_size"),
        (
            "after 2**62",
            pb.ListTrainingRunsRequest(created_after=Timestamp(seconds=2**62)),
            "created_after",
        ),
        (
            "after nanos",
            pb.ListTrainingRunsRequest(created_after=Timestamp(nanos=-1)),
            "created_after",
        ),
        (
            "before",
            pb.ListTrainingRunsRequest(created_before=Timestamp(seconds=-(2**62))),
            "created_before",
        ),
        ("order_by", pb.ListTrainingRunsRequest(order_by="name; DROP TABLE runs"), "order_by"),
        ("order_by huge", pb.ListTrainingRunsRequest(order_by=HUGE), "order_by"),
        ("dataset_uri nul", pb.ListTrainingRunsRequest(dataset_uri=NUL), "dataset_uri"),
        ("dataset_uri huge", pb.ListTrainingRunsRequest(dataset_uri=HUGE), "dataset_uri"),
        ("creator nul", pb.ListTrainingRunsRequest(creator=NUL), "creator"),
        ("creator huge", pb.ListTrainingRunsRequest(creator=HUGE), "creator"),
        ("base_model", pb.ListTrainingRunsRequest(base_model="trainedModels/x"), "base_model"),
        ("base_model nul", pb.ListTrainingRunsRequest(base_model=NUL), "base_model"),
    ):
        await battery.refused(label, list_runs, request, field=field)
    for edited in tampered(token):
        await battery.refused(
            "edited token",
            list_runs,
            pb.ListTrainingRunsRequest(page_size=1, page_token=edited),
            field="page_token",
        )
    for other_query in (
        pb.ListTrainingRunsRequest(page_size=1, page_token=token, order_by="create_time"),
        pb.ListTrainingRunsRequest(page_size=1, page_token=token, states=[1]),
        pb.ListTrainingRunsRequest(page_size=1, page_token=token, creator="other"),
    ):
        await battery.refused("token of another query", list_runs, other_query, field="page_token")
    for edited in tampered(token)[:5]:
        await battery.refused(
            "events token",
            runs.ListTrainingRunEvents,
            pb.ListTrainingRunEventsRequest(name=run.name, page_token=edited),
            field="page_token",
        )
        await battery.refused(
            "models token",
            models.ListTrainedModels,
            mpb.ListTrainedModelsRequest(page_token=edited),
            field="page_token",
        )
        await battery.refused(
            "publication token",
            models.ListPublicationEvents,
            mpb.ListPublicationEventsRequest(page_token=edited),
            field="page_token",
        )
        await battery.refused(
            "audit token",
            audit.ListAuditRecords,
            audit_pb2.ListAuditRecordsRequest(page_token=edited),
            field="page_token",
        )
    # A token of one list is not a token of another.
    for label, call, request in (
        (
            "events",
            runs.ListTrainingRunEvents,
            pb.ListTrainingRunEventsRequest(name=run.name, page_token=token),
        ),
        ("models", models.ListTrainedModels, mpb.ListTrainedModelsRequest(page_token=token)),
        (
            "publications",
            models.ListPublicationEvents,
            mpb.ListPublicationEventsRequest(page_token=token),
        ),
        ("audit", audit.ListAuditRecords, audit_pb2.ListAuditRecordsRequest(page_token=token)),
    ):
        await battery.refused(f"foreign token {label}", call, request, field="page_token")
    await battery.refused(
        "events size",
        runs.ListTrainingRunEvents,
        pb.ListTrainingRunEventsRequest(name=run.name, page_size=-5),
        field="page_size",
    )

    # TrainedModelService.
    for name in BAD_MODEL_NAMES:
        calls = (
            ("get", models.GetTrainedModel, mpb.GetTrainedModelRequest(name=name)),
            (
                "lineage",
                models.GetTrainedModelLineage,
                mpb.GetTrainedModelLineageRequest(name=name),
            ),
            (
                "delete",
                models.DeleteTrainedModel,
                mpb.DeleteTrainedModelRequest(name=name, etag="e"),
            ),
            ("publish", models.PublishTrainedModel, mpb.PublishTrainedModelRequest(name=name)),
            (
                "unpublish",
                models.UnpublishTrainedModel,
                mpb.UnpublishTrainedModelRequest(name=name),
            ),
            (
                "update",
                models.UpdateTrainedModel,
                mpb.UpdateTrainedModelRequest(
                    trained_model=mpb.TrainedModel(name=name, display_name="x"),
                    update_mask=FieldMask(paths=["display_name"]),
                ),
            ),
            (
                "publications",
                models.ListPublicationEvents,
                # A name of no model lists no events: not a refusal.
                mpb.ListPublicationEventsRequest(
                    trained_model=NUL if name in ("", f"trainedModels/{MISSING}") else name
                ),
            ),
        )
        download = (
            "download",
            models.DownloadTrainedModel,
            mpb.DownloadTrainedModelRequest(name=name),
        )
        await battery.refused_naming(name, calls, download, prefix="model ")
    model_name = f"trainedModels/{MISSING}"
    for kind in (NUL, HUGE, "../checkpoint", "metrics"):
        await battery.refused(
            "artifact_kind",
            models.DownloadTrainedModel,
            mpb.DownloadTrainedModelRequest(name=model_name, artifact_kind=kind),
            field="artifact_kind",
            streaming=True,
        )
    for label, request, field in (
        (
            "depth",
            mpb.GetTrainedModelLineageRequest(name=model_name, descendant_depth=-1),
            "descendant_depth",
        ),
        (
            "min_bbox_map nan",
            mpb.PublishTrainedModelRequest(name=model_name, min_bbox_map=float("nan")),
            "min_bbox_map",
        ),
        (
            "min_bbox_map inf",
            mpb.PublishTrainedModelRequest(name=model_name, min_bbox_map=float("inf")),
            "min_bbox_map",
        ),
        ("channel nul", mpb.PublishTrainedModelRequest(name=model_name, channel=NUL), "channel"),
        ("channel huge", mpb.PublishTrainedModelRequest(name=model_name, channel=HUGE), "channel"),
        ("reason", mpb.PublishTrainedModelRequest(name=model_name, reason=HUGE), "reason"),
        ("etag", mpb.PublishTrainedModelRequest(name=model_name, etag=NUL), "etag"),
        (
            "split",
            mpb.PublishTrainedModelRequest(name=model_name, evaluation_split=HUGE),
            "evaluation_split",
        ),
    ):
        call = models.GetTrainedModelLineage if label == "depth" else models.PublishTrainedModel
        await battery.refused(label, call, request, field=field)
    for request in (
        mpb.PublishTrainedModelRequest(name=model_name, min_bbox_map=-1),
        mpb.PublishTrainedModelRequest(name=model_name, channel="UPPER case"),
        mpb.PublishTrainedModelRequest(name=model_name, evaluation_epoch=-1),
        mpb.PublishTrainedModelRequest(name=model_name, evaluation_split="train"),
        mpb.UnpublishTrainedModelRequest(name=model_name, reason=UNICODE),
        mpb.GetTrainedModelLineageRequest(name=model_name, descendant_depth=2**31 - 1),
    ):
        call = {
            mpb.PublishTrainedModelRequest: models.PublishTrainedModel,
            mpb.UnpublishTrainedModelRequest: models.UnpublishTrainedModel,
            mpb.GetTrainedModelLineageRequest: models.GetTrainedModelLineage,
        }[type(request)]
        await battery.refused(
            "model numbers", call, request, {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
        )
    for reason in (NUL, HUGE):
        await battery.refused(
            "unpublish reason",
            models.UnpublishTrainedModel,
            mpb.UnpublishTrainedModelRequest(name=model_name, reason=reason),
            field="reason",
        )

    def edit(mask: Iterable[str], **fields: Any) -> mpb.UpdateTrainedModelRequest:
        return mpb.UpdateTrainedModelRequest(
            trained_model=mpb.TrainedModel(name=model_name, **fields),
            update_mask=FieldMask(paths=mask),
        )

    for mask in (["classes"], ["publication"], [NUL], [HUGE]):
        await battery.refused(
            "model mask",
            models.UpdateTrainedModel,
            edit(mask, display_name="x"),
            {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
        )
    for labels in BAD_LABELS:
        await battery.refused(
            "model labels",
            models.UpdateTrainedModel,
            edit(["labels"], labels=labels),
            field="trained_model.labels",
        )
    await battery.refused(
        "model description",
        models.UpdateTrainedModel,
        edit(["description"], description=HUGE),
        field="trained_model.description",
    )
    await battery.refused(
        "model display_name",
        models.UpdateTrainedModel,
        edit(["display_name"], display_name=NUL),
        field="trained_model.display_name",
    )
    list_models = models.ListTrainedModels
    for label, request, field in (
        ("order_by", mpb.ListTrainedModelsRequest(order_by="bbox; --"), "order_by"),
        ("class nul", mpb.ListTrainedModelsRequest(class_name=NUL), "class_name"),
        ("class huge", mpb.ListTrainedModelsRequest(class_name=HUGE), "class_name"),
        ("architecture", mpb.ListTrainedModelsRequest(architecture=NUL), "architecture"),
        ("creator", mpb.ListTrainedModelsRequest(creator=HUGE), "creator"),
        ("dataset_uri", mpb.ListTrainedModelsRequest(dataset_uri=NUL), "dataset_uri"),
        (
            "training_run",
            mpb.ListTrainedModelsRequest(training_run="trainedModels/x"),
            "training_run",
        ),
        ("base_model", mpb.ListTrainedModelsRequest(base_model=TRAVERSAL), "base_model"),
        (
            "after",
            mpb.ListTrainedModelsRequest(created_after=Timestamp(seconds=2**62)),
            "created_after",
        ),
        (
            "before",
            mpb.ListTrainedModelsRequest(created_before=Timestamp(nanos=-1)),
            "created_before",
        ),
        ("size", mpb.ListTrainedModelsRequest(page_size=-1), "page_size"),
    ):
        await battery.refused(f"models {label}", list_models, request, field=field)
    for label, request, field in (
        ("channel", mpb.ListPublicationEventsRequest(channel=NUL), "channel"),
        ("size", mpb.ListPublicationEventsRequest(page_size=-1), "page_size"),
    ):
        await battery.refused(
            f"publications {label}", models.ListPublicationEvents, request, field=field
        )

    # ImportTrainedModel: a client stream whose first message must be valid metadata.
    def metadata(**fields: Any) -> mpb.ImportTrainedModelRequest:
        values = {
            "display_name": "imported",
            "architecture": "retinanet_r18_fpn",
            "classes": ["cat"],
            "config_uri": "file:///nowhere/c.py",
            "checkpoint_uri": "file:///nowhere/c.pth",
            **fields,
        }
        return mpb.ImportTrainedModelRequest(
            metadata=mpb.ImportTrainedModelRequest.Metadata(**values)
        )

    async def stream(*messages: mpb.ImportTrainedModelRequest) -> AsyncIterator[Message]:
        for message in messages:
            yield message

    import_cases: list[tuple[str, Callable[[], Any], set[Code] | Code, str | None]] = [
        ("empty", lambda: stream(), Code.INVALID_ARGUMENT, "metadata"),
        (
            "chunk first",
            lambda: stream(mpb.ImportTrainedModelRequest(config_chunk=b"x")),
            Code.INVALID_ARGUMENT,
            "metadata",
        ),
        (
            "display_name",
            lambda: stream(metadata(display_name=NUL)),
            Code.INVALID_ARGUMENT,
            "metadata.display_name",
        ),
        (
            "description",
            lambda: stream(metadata(description=HUGE)),
            Code.INVALID_ARGUMENT,
            "metadata.description",
        ),
        (
            "architecture",
            lambda: stream(metadata(architecture=NUL)),
            Code.INVALID_ARGUMENT,
            "metadata.architecture",
        ),
        (
            "classes nul",
            lambda: stream(metadata(classes=["cat", NUL])),
            Code.INVALID_ARGUMENT,
            "metadata.classes",
        ),
        (
            "classes many",
            lambda: stream(metadata(classes=[f"c{i}" for i in range(1001)])),
            Code.INVALID_ARGUMENT,
            "metadata.classes",
        ),
        (
            "classes empty",
            lambda: stream(metadata(classes=[""])),
            Code.INVALID_ARGUMENT,
            "metadata.classes",
        ),
        (
            "config_uri",
            lambda: stream(metadata(config_uri=HUGE)),
            Code.INVALID_ARGUMENT,
            "metadata.config_uri",
        ),
        (
            "checkpoint_uri",
            lambda: stream(metadata(checkpoint_uri=NUL)),
            Code.INVALID_ARGUMENT,
            "metadata.checkpoint_uri",
        ),
        (
            "request_id",
            lambda: stream(metadata(request_id="not-a-uuid")),
            Code.INVALID_ARGUMENT,
            "metadata.request_id",
        ),
        ("one uri", lambda: stream(metadata(checkpoint_uri="")), Code.INVALID_ARGUMENT, None),
    ]
    for labels in BAD_LABELS:
        import_cases.append(
            (
                "labels",
                lambda labels=labels: stream(metadata(labels=labels)),
                Code.INVALID_ARGUMENT,
                "metadata.labels",
            )
        )
    for label, requests, expected, field in import_cases:
        await battery.refused(
            f"import {label}", models.ImportTrainedModel, requests(), expected, field=field
        )

    # ListAuditRecords filters.
    for field in ("identity", "rpc", "outcome", "resource"):
        for value in (NUL, HUGE):
            await battery.refused(
                f"audit {field}",
                audit.ListAuditRecords,
                audit_pb2.ListAuditRecordsRequest(**{field: value}),
                field=field,
            )
    await battery.refused(
        "audit size",
        audit.ListAuditRecords,
        audit_pb2.ListAuditRecordsRequest(page_size=-1),
        field="page_size",
    )

    assert battery.sent > 350
    assert await count_runs(runs) == runs_before, "an invalid request created a run"
    assert await count_models(models) == models_before, "an invalid request created a model"
    again = await runs.GetTrainingRun(pb.GetTrainingRunRequest(name=run.name))
    assert again.display_name == run.display_name and dict(again.labels) == dict(run.labels)
    assert again.state == TrainingRun.QUEUED

    # The event pipeline still delivers: a valid run's first event reaches the stream.
    fresh = await runs.CreateTrainingRun(create_request(dataset_uri))
    subject = subjects.run_event(fresh.name.removeprefix("trainingRuns/"))

    async def published() -> int:
        info = await js.stream_info(subjects.events_stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    await eventually(published, timeout=15)


TrainingRun = pb.TrainingRun

# Bytes that no message parses: a length-delimited field 1 longer than what follows.
TRUNCATED = b"\x0a\x7fshort"
# A string field 1 that is not UTF-8.
NOT_UTF8 = b"\x0a\x02\xc3\x28"


def _methods() -> list[tuple[str, Any]]:
    found = []
    for module, service in (
        (training_run_pb2, "TrainingRunService"),
        (trained_model_pb2, "TrainedModelService"),
        (audit_pb2, "AuditService"),
    ):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            found.append((f"/{method.containing_service.full_name}/{method.name}", method))
    return found


async def test_request_bytes_that_do_not_parse_are_invalid_arguments_on_every_rpc(
    runs_channel, models_channel, settings
):
    battery = Battery(settings)
    methods = _methods()
    assert len(methods) == 28
    for path, method in methods:
        channel = models_channel if "TrainedModelService" in path else runs_channel
        for raw in (TRUNCATED, NOT_UTF8, b"\xff" * 64):
            if method.client_streaming:
                factory = channel.stream_stream if method.server_streaming else channel.stream_unary

                async def requests(raw: bytes = raw) -> AsyncIterator[bytes]:
                    yield raw

                argument: Any = requests()
            else:
                factory = channel.unary_stream if method.server_streaming else channel.unary_unary
                argument = raw
            call = factory(path)
            try:
                if method.server_streaming:
                    async for _ in call(argument, timeout=DEADLINE_S):
                        pass
                else:
                    await call(argument, timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                if raw == NOT_UTF8 and error.code() == Code.INVALID_ARGUMENT:
                    # Where field 1 is not a string, these bytes parse: refused for their content.
                    battery.check(path, error, {Code.INVALID_ARGUMENT})
                    continue
                battery.check(path, error, {Code.INVALID_ARGUMENT})
                assert error.details() == f"request is not a valid {method.input_type.name}", (
                    path,
                    error.details(),
                )
                continue
            if raw == NOT_UTF8:
                continue  # ListArchitectures: field 1 unknown, the request is valid.
            raise AssertionError(f"{path}: unparseable bytes accepted")


async def test_a_request_over_the_receive_limit_is_refused_as_too_large(runs, dataset_uri):
    request = create_request(dataset_uri)
    request.training_run.display_name = "x" * (17 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request, timeout=30)
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED


async def test_labels_at_their_bounds_are_kept_and_past_them_refused_on_create_and_update(
    runs, dataset_uri
):
    labels = {f"{i:02d}" + "k" * 61: "v" * 256 for i in range(64)}
    request = create_request(dataset_uri)
    request.training_run.labels.update(labels)
    run = await runs.CreateTrainingRun(request)
    assert dict(run.labels) == labels
    over = {**labels, "one-more": "v"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.UpdateTrainingRun(
            pb.UpdateTrainingRunRequest(
                training_run=pb.TrainingRun(name=run.name, labels=over),
                update_mask=FieldMask(paths=["labels"]),
            )
        )
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert "at most 64 labels" in violations(caught.value)["training_run.labels"]
    # A run read and sent back whole (server-set fields included) is accepted.
    run.display_name = "renamed"
    updated = await runs.UpdateTrainingRun(
        pb.UpdateTrainingRunRequest(training_run=run, update_mask=FieldMask(paths=["display_name"]))
    )
    assert updated.display_name == "renamed"


async def test_a_page_of_runs_stays_under_the_byte_budget(
    runs, settings, monkeypatch: pytest.MonkeyPatch
):
    folder = Path(settings.artifact_root) / "datasets" / f"paged-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "annotations.json").write_text('{"images": [], "annotations": [], "categories": []}')
    uri = f"datasets/{folder.name}/annotations.json"
    heavy = {f"{i:02d}" + "k" * 61: "v" * 256 for i in range(64)}
    created = set()
    for _ in range(5):
        request = create_request(uri)
        request.training_run.labels.update(heavy)
        created.add((await runs.CreateTrainingRun(request)).name)
    one = await runs.ListTrainingRuns(pb.ListTrainingRunsRequest(dataset_uri=uri, page_size=1))
    size = one.training_runs[0].ByteSize()
    assert size > 20_000
    # The services run in this process: a budget of two and a half runs per page.
    monkeypatch.setattr(pagination, "MAX_PAGE_BYTES", int(size * 2.5))
    seen, token, pages = [], "", 0
    while True:
        page = await runs.ListTrainingRuns(
            pb.ListTrainingRunsRequest(dataset_uri=uri, page_size=1000, page_token=token)
        )
        pages += 1
        assert 1 <= len(page.training_runs) <= 2
        seen += [r.name for r in page.training_runs]
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == 5 and set(seen) == created


async def test_a_broken_import_stream_is_refused_and_leaves_no_upload(
    models, models_channel, settings
):
    """Valid metadata, then a chunk that does not parse; and a client that gives up midway."""
    uploads = Path(settings.artifact_root) / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()
    metadata = mpb.ImportTrainedModelRequest(
        metadata=mpb.ImportTrainedModelRequest.Metadata(
            display_name="broken", architecture="retinanet_r18_fpn", classes=["cat"]
        )
    )

    async def then_garbage() -> AsyncIterator[bytes]:
        yield metadata.SerializeToString()
        yield mpb.ImportTrainedModelRequest(config_chunk=b"x" * 1024).SerializeToString()
        yield TRUNCATED

    call = models_channel.stream_unary("/raven.training.v1.TrainedModelService/ImportTrainedModel")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(then_garbage(), timeout=DEADLINE_S)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert caught.value.details() == "request is not a valid ImportTrainedModelRequest"

    gave_up = asyncio.Event()

    async def then_silence() -> AsyncIterator[mpb.ImportTrainedModelRequest]:
        yield metadata
        yield mpb.ImportTrainedModelRequest(config_chunk=b"x" * 1024)
        gave_up.set()
        await asyncio.sleep(60)

    pending = models.ImportTrainedModel(then_silence(), timeout=DEADLINE_S)
    await gave_up.wait()
    await asyncio.sleep(0.2)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending

    async def cleaned() -> bool:
        now = set(uploads.iterdir()) if uploads.exists() else set()
        return now <= before

    await eventually(cleaned, timeout=10)
