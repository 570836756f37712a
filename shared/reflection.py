"""Server reflection that serves the protos with their comments.

The generated modules register their files without source info, so a reflection
client (grpcurl describe, Postman, evans) would see bare fields: no units, bounds or
defaults. `make proto` also writes every file with its comments to a descriptor set
(shared/proto/raven/descriptors.binpb); this servicer finds files as the stock one does,
in the process's descriptor pool, and sends the described copy of each file it has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from importlib import resources

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as pb
from grpc_reflection.v1alpha import reflection_pb2_grpc

log = structlog.get_logger(__name__)

DESCRIPTOR_SET = "descriptors.binpb"
# grpc.reflection.v1 has the fields of v1alpha with the same numbers.
V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def described_files() -> dict[str, bytes]:
    """The serialized FileDescriptorProto, comments included, of each file of protos/ and
    of the files they import, by file name; empty when the set was not generated."""
    try:
        data = (resources.files("shared.proto.raven") / DESCRIPTOR_SET).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        log.warning("no descriptor set: reflection serves the protos without comments")
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {file.name: file.SerializeToString() for file in files}


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """grpc.reflection.v1alpha.ServerReflection over the default descriptor pool, answering
    with the described copy of a file where `described` has one."""

    def __init__(self, service_names: Iterable[str], described: Mapping[str, bytes]) -> None:
        self._service_names = tuple(sorted(service_names))
        self._described = dict(described)
        self._pool = descriptor_pool.Default()

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterator[pb.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[pb.ServerReflectionRequest, pb.ServerReflectionResponse],
    ) -> AsyncIterator[pb.ServerReflectionResponse]:
        async for request in request_iterator:
            yield self._answer(request)

    def _answer(self, request: pb.ServerReflectionRequest) -> pb.ServerReflectionResponse:
        asked = request.WhichOneof("message_request")
        try:
            if asked == "file_by_filename":
                return self._files(request, self._pool.FindFileByName(request.file_by_filename))
            if asked == "file_containing_symbol":
                symbol = request.file_containing_symbol
                return self._files(request, self._pool.FindFileContainingSymbol(symbol))
            if asked == "file_containing_extension":
                wanted = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(wanted.containing_type)
                extension = self._pool.FindExtensionByNumber(message, wanted.extension_number)
                return self._files(
                    request, self._pool.FindFileContainingSymbol(extension.full_name)
                )
            if asked == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                return pb.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=pb.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                )
            if asked == "list_services":
                return pb.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=pb.ListServiceResponse(
                        service=[pb.ServiceResponse(name=name) for name in self._service_names]
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND)
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT)

    def _files(
        self, request: pb.ServerReflectionRequest, file: FileDescriptor
    ) -> pb.ServerReflectionResponse:
        """`file` and every file it imports, directly or not, each once."""
        found: dict[str, FileDescriptor] = {}
        pending = [file]
        while pending:
            current = pending.pop()
            if current.name not in found:
                found[current.name] = current
                pending.extend(current.dependencies)
        return pb.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=pb.FileDescriptorResponse(
                file_descriptor_proto=[self._serialized(f) for f in found.values()]
            ),
        )

    def _serialized(self, file: FileDescriptor) -> bytes:
        described = self._described.get(file.name)
        if described is not None:
            return described
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        return proto.SerializeToString()


def _error(
    request: pb.ServerReflectionRequest, code: grpc.StatusCode
) -> pb.ServerReflectionResponse:
    number, message = code.value
    return pb.ServerReflectionResponse(
        original_request=request,
        error_response=pb.ErrorResponse(error_code=number, error_message=message),
    )


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Adds reflection for `service_names` to `server`, as grpc.reflection.v1alpha and as
    grpc.reflection.v1 (the same messages under a new package name: newer clients ask it
    first)."""
    alpha = str(pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name)
    servicer = ReflectionServicer((*service_names, alpha, V1_SERVICE), described_files())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=pb.ServerReflectionRequest.FromString,
        response_serializer=pb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),)
    )
