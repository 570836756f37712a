"""What every gRPC server of the backbone has: health, reflection, limits."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared import reflection
from shared.auth.admission import Admission
from shared.calls import CallWrapper
from shared.observability.rpc_metrics import MetricsInterceptor, RpcMetrics
from shared.observability.tracing_grpc import ObservedCalls

_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class Server:
    """A grpc.aio server with health checking and reflection for `service_names`.

    Every handler runs inside the one wrapper (`shared.calls`): `admission` admits the
    caller (None: everyone), the request is checked, errors become statuses. With
    `metrics`, an interceptor around it counts every call with the status it ended with.
    `share_port`: other processes of the service listen on the same port (SO_REUSEPORT,
    shared/prefork.py); otherwise a second server on the port is refused, not sharing it."""

    def __init__(
        self,
        service_names: Sequence[str],
        *,
        admission: Admission | None = None,
        metrics: RpcMetrics | None = None,
        share_port: bool = False,
    ) -> None:
        # ObservedCalls and the metrics first: they see the status CallWrapper sets.
        outer = (MetricsInterceptor(metrics),) if metrics is not None else ()
        self.server = grpc.aio.server(
            options=[*_OPTIONS, ("grpc.so_reuseport", int(share_port))],
            interceptors=(*outer, ObservedCalls(), CallWrapper(admission)),
        )
        self.health = health.aio.HealthServicer()
        self._service_names = tuple(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # The protos with their comments (shared.reflection), for grpcurl describe and the like.
        reflection.enable(self.server, (*self._service_names, health.SERVICE_NAME))

    def listen(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Binds `address` (port 0 picks a free one) with TLS `credentials`, or plaintext when
        None (development mode: shared.auth.transport decides); returns the port."""
        if credentials is None:
            port: int = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        return port

    async def start(self) -> None:
        await self.server.start()
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)

    async def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *self._service_names):
            await self.health.set(name, status)
