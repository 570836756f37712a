"""The generated messages and stubs of protos/raven/training/v1, for requests the client
has no method for: `from raven_client.pb import training_run_pb2`."""

from raven_client._proto.raven.training.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    trained_model_pb2,
    trained_model_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
)

__all__ = [
    "audit_pb2",
    "audit_pb2_grpc",
    "common_pb2",
    "trained_model_pb2",
    "trained_model_pb2_grpc",
    "training_run_pb2",
    "training_run_pb2_grpc",
]
