"""gRPC channels and stubs for the CLI, and the one place RPC errors become exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.text import Text

from shared.auth import transport
from shared.auth.certs import ensure_dev_certs
from shared.auth.transport import ClientTls
from shared.proto.raven.training.v1 import (
    audit_pb2_grpc,
    trained_model_pb2_grpc,
    training_run_pb2_grpc,
)
from shared.settings import Settings

# Unary calls answer in milliseconds; a deadline turns a hung server into an error.
UNARY_TIMEOUT_S = 15.0


P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True)


@dataclass(frozen=True, slots=True)
class Clients:
    runs: training_run_pb2_grpc.TrainingRunServiceStub
    models: trained_model_pb2_grpc.TrainedModelServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    runs_addr: str
    models_addr: str


def client_tls(settings: Settings) -> ClientTls | None:
    """The CLI's mTLS credentials: RAVEN_TLS_* when set, else the development certificates
    under RAVEN_DEV_CERTS_DIR (created on first use, like `make certs`); None only in
    development plaintext mode (RAVEN_INSECURE_DEV)."""
    if settings.insecure_dev or settings.tls_cert_file or settings.tls_ca_file:
        return transport.client_tls(settings)
    dev, _ = ensure_dev_certs(settings.dev_certs_dir)
    return ClientTls.from_files(
        ca=dev.ca, cert=dev.cli.cert, key=dev.cli.key, server_name=settings.tls_server_name
    )


@contextmanager
def connect(settings: Settings | None = None) -> Iterator[Clients]:
    """Stubs for both services at the addresses in Settings (RAVEN_*_ADDR), over mTLS."""
    settings = settings or Settings()
    tls = client_tls(settings)
    with (
        transport.channel(settings.training_runs_addr, tls) as runs_channel,
        transport.channel(settings.trained_models_addr, tls) as models_channel,
    ):
        yield Clients(
            runs=training_run_pb2_grpc.TrainingRunServiceStub(runs_channel),
            models=trained_model_pb2_grpc.TrainedModelServiceStub(models_channel),
            audit=audit_pb2_grpc.AuditServiceStub(runs_channel),
            runs_addr=settings.training_runs_addr,
            models_addr=settings.trained_models_addr,
        )


def describe_rpc_error(error: grpc.RpcError) -> list[str]:
    """Status code, message and BadRequest field violations, one line each."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    lines = [f"{code.name if code else 'UNKNOWN'}: {details or '(no message)'}"]
    try:
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    except ValueError:
        status = None  # Detail trailer inconsistent with the status: show what we have.
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"  {v.field}: {v.description}" for v in bad_request.field_violations]
    if code == grpc.StatusCode.UNAVAILABLE:
        lines.append("  Is the stack running? `make up` starts it; `raven stack status` shows it.")
        lines.append("  A refused TLS handshake reads the same: check RAVEN_TLS_* (`make certs`).")
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        lines.append("  The policy file (RAVEN_AUTH_POLICY_FILE) does not grant this to you.")
    return lines


def exit_on_rpc_error(command: Callable[P, R]) -> Callable[P, R]:
    """Prints an RPC error (no traceback) and exits 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except grpc.RpcError as error:
            first, *rest = describe_rpc_error(error)
            err_console.print(
                Text.assemble(("error ", "bold red"), first), highlight=False, soft_wrap=True
            )
            for line in rest:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
