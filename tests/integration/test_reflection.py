"""Server reflection over the real servers serves the protos with their comments, which
say the units, bounds and defaults that the field types alone do not."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.timeout(60)

# FileDescriptorProto.message_type, DescriptorProto.field (descriptor.proto's numbers).
_MESSAGE_TYPE, _FIELD = 4, 2


async def _ask(
    channel: grpc.aio.Channel, requests: Sequence[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return [response async for response in stub.ServerReflectionInfo(iter(requests))]


async def _files_of(
    channel: grpc.aio.Channel, symbol: str
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    [response] = await _ask(
        channel, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
    )
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]
    return {file.name: file for file in files}


def _field_comment(file: descriptor_pb2.FileDescriptorProto, message: str, field: str) -> str:
    m = next(i for i, t in enumerate(file.message_type) if t.name == message)
    f = next(i for i, d in enumerate(file.message_type[m].field) if d.name == field)
    path = [_MESSAGE_TYPE, m, _FIELD, f]
    located = [loc for loc in file.source_code_info.location if list(loc.path) == path]
    assert located, f"no source info for {message}.{field}"
    return located[0].leading_comments


async def test_the_training_run_service_file_carries_its_comments(runs_channel):
    files = await _files_of(runs_channel, "raven.training.v1.TrainingRunService")
    run_file = files["raven/training/v1/training_run.proto"]
    assert run_file.service[0].name == "TrainingRunService"
    comment = _field_comment(run_file, "TrainingSpec", "dataset_uri")
    assert 'COCO dataset: "file:///abs/annotations.json"' in comment
    assert "relative to the annotation file's folder" in comment
    frozen = _field_comment(run_file, "TrainingSpec", "frozen_stages")
    assert "-1 (none frozen) to 4" in frozen
    # Its imports come along, ours with their comments too.
    assert {"raven/training/v1/common.proto", "google/protobuf/timestamp.proto"} <= set(files)
    assert files["raven/training/v1/common.proto"].source_code_info.location


async def test_the_trained_model_service_and_files_by_name_carry_comments(models_channel):
    files = await _files_of(models_channel, "raven.training.v1.TrainedModelService")
    comment = _field_comment(
        files["raven/training/v1/trained_model.proto"], "PublishTrainedModelRequest", "min_bbox_map"
    )
    assert "Refuse unless the model's coco/bbox_mAP is at least this." in comment
    [by_name] = await _ask(
        models_channel,
        [reflection_pb2.ServerReflectionRequest(file_by_filename="raven/training/v1/common.proto")],
    )
    [data, *_] = by_name.file_descriptor_response.file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(data).source_code_info.location


async def test_reflection_lists_the_services_and_refuses_unknown_symbols(runs_channel):
    listed, unknown = await _ask(
        runs_channel,
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="raven.Nothing"),
        ],
    )
    names = {service.name for service in listed.list_services_response.service}
    assert {
        "raven.training.v1.TrainingRunService",
        "raven.training.v1.AuditService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    } <= names
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_answers_as_grpc_reflection_v1_too(runs_channel):
    """Newer clients (grpcurl among them) ask grpc.reflection.v1 first; its messages are
    v1alpha's with the same field numbers."""
    call = runs_channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="raven.training.v1.TrainingSpec"
    )
    [response] = [r async for r in call(iter([request]))]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]
    run_file = next(f for f in files if f.name == "raven/training/v1/training_run.proto")
    assert "Images are resized to fit a square" in _field_comment(
        run_file, "TrainingSpec", "image_size"
    )
