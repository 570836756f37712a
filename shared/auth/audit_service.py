"""AuditService over gRPC: the audit trail, newest first, for admins."""

from __future__ import annotations

import grpc

from shared import pagination
from shared.auth.audit import AuditFilter, AuditLog
from shared.proto.raven.training.v1 import audit_pb2 as pb
from shared.proto.raven.training.v1 import audit_pb2_grpc


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditRecordsResponse:
        filter_ = AuditFilter(
            identity=request.identity,
            rpc=request.rpc,
            outcome=request.outcome,
            resource=request.resource,
        )
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint(
            {
                "identity": filter_.identity,
                "rpc": filter_.rpc,
                "outcome": filter_.outcome,
                "resource": filter_.resource,
            }
        )
        after = pagination.decode(request.page_token, fingerprint, time_value=False)
        records, token = pagination.page(
            await self._audit.list(filter_, limit=size + 1, after=after),
            size,
            _cursor,
            fingerprint,
            weight=lambda record: record.ByteSize(),
        )
        return pb.ListAuditRecordsResponse(audit_records=records, next_page_token=token)


def _cursor(record: pb.AuditRecord) -> pagination.Cursor:
    record_id = record.name.rsplit("/", 1)[1]
    return pagination.Cursor(int(record_id), record_id)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditService"].full_name
