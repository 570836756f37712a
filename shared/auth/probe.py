"""`python -m shared.auth.probe HOST:PORT`: exit 0 when Health/Check answers SERVING over mTLS.

For container health checks and Kubernetes exec probes: the kubelet's built-in gRPC
probe speaks no TLS, and the servers accept nothing else. Uses RAVEN_TLS_* (a
workload's own certificate is a valid client certificate: health is open to any
verified peer).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.auth import transport
from shared.settings import Settings


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m shared.auth.probe HOST:PORT", file=sys.stderr)
        return 2
    settings = Settings()
    with transport.channel(argv[1], transport.client_tls(settings)) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as error:
            print(f"not serving: {error}", file=sys.stderr)
            return 1
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
