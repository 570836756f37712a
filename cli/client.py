"""gRPC channels and stubs for the CLI, and the one place RPC errors become exit codes.

Light on purpose: the channels come from raven_client, the settings from cli.config, so
that starting `raven` loads neither pydantic nor the services' libraries."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import grpc
import typer
from raven_client import Problem, Tls, open_channel, probe
from rich.console import Console
from rich.text import Text

from cli.config import CliConfig, ConfigError, ConnectionSettings
from cli.tls import TlsFilesError, resolve_tls
from shared.proto.raven.training.v1 import (
    audit_pb2_grpc,
    trained_model_pb2_grpc,
    training_run_pb2_grpc,
)

if TYPE_CHECKING:
    from shared.auth.transport import ClientTls

# Unary calls answer in milliseconds; a deadline turns a hung server into an error.
UNARY_TIMEOUT_S = 15.0
# How long the probe after an UNAVAILABLE waits for a server.
DIAGNOSE_TIMEOUT_S = 3.0


P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True)

# The addresses and TLS files of this process's connections, for explaining an UNAVAILABLE.
_targets: dict[str, Tls | None] = {}

# Advice on the CLI's settings, after raven_client's diagnosis.
_ADVICE = {
    Problem.NOTHING_LISTENING: "is the stack running? `make up` starts it",
    Problem.SERVER_NAME_MISMATCH: "RAVEN_TLS_SERVER_NAME names the one to check",
    Problem.SERVER_UNKNOWN_CA: "RAVEN_TLS_CA_FILE must be the CA that signed it",
    Problem.CLIENT_CERT_REFUSED: "check RAVEN_TLS_CERT_FILE",
    Problem.NOT_TLS: "a development stack in plaintext wants RAVEN_INSECURE_DEV=true",
}


@dataclass(frozen=True, slots=True)
class Clients:
    runs: training_run_pb2_grpc.TrainingRunServiceStub
    models: trained_model_pb2_grpc.TrainedModelServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    runs_addr: str
    models_addr: str


def client_tls(settings: ConnectionSettings) -> ClientTls | None:
    """The local stack's view of the CLI's credentials (cli/devstack.py, cli/demo.py): like
    connect(), but the development certificates are created when missing, as the stack
    they talk to does (`make up`, `make run`)."""
    from shared.auth import transport
    from shared.auth.certs import ensure_dev_certs
    from shared.settings import Settings

    if settings.insecure_dev or settings.tls_cert_file or settings.tls_ca_file:
        return transport.client_tls(settings if isinstance(settings, Settings) else Settings())
    dev, _ = ensure_dev_certs(settings.dev_certs_dir)
    return transport.ClientTls.from_files(
        ca=dev.ca, cert=dev.cli.cert, key=dev.cli.key, server_name=settings.tls_server_name
    )


@contextmanager
def connect(settings: ConnectionSettings | None = None) -> Iterator[Clients]:
    """Stubs for both services at RAVEN_*_ADDR, over mTLS with checked files; a setting or
    file the CLI cannot use is one line and exit 1."""
    try:
        config = settings or CliConfig.from_env()
        tls = resolve_tls(config)
    except (ConfigError, TlsFilesError) as error:
        fail(str(error))
    runs_addr, models_addr = config.training_runs_addr, config.trained_models_addr
    _targets.clear()
    _targets.update({runs_addr: tls, models_addr: tls})
    with open_channel(runs_addr, tls) as runs_channel, open_channel(models_addr, tls) as models:
        yield Clients(
            runs=training_run_pb2_grpc.TrainingRunServiceStub(runs_channel),
            models=trained_model_pb2_grpc.TrainedModelServiceStub(models),
            audit=audit_pb2_grpc.AuditServiceStub(runs_channel),
            runs_addr=runs_addr,
            models_addr=models_addr,
        )


def fail(line: str) -> NoReturn:
    """Prints `error LINE` and exits 1."""
    err_console.print(Text.assemble(("error ", "bold red"), line), highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def describe_rpc_error(error: grpc.RpcError) -> list[str]:
    """Status code, message and BadRequest field violations, one line each."""
    # Only a failed command pays for the detail messages.
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

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


def diagnose_unavailable() -> str | None:
    """Why this process's servers are unavailable, in one line, when a probe can tell."""
    for address, tls in _targets.items():
        found = probe(address, tls, timeout=DIAGNOSE_TIMEOUT_S)
        if found is not None:
            advice = _ADVICE.get(found.problem)
            return f"{found.message}: {advice}" if advice else found.message
    return None


def exit_on_rpc_error(command: Callable[P, R]) -> Callable[P, R]:
    """Prints an RPC error (no traceback) and exits 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except grpc.RpcError as error:
            unavailable = (
                isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE
            )
            diagnosis = diagnose_unavailable() if unavailable else None
            if diagnosis is not None:
                fail(diagnosis)
            first, *rest = describe_rpc_error(error)
            err_console.print(
                Text.assemble(("error ", "bold red"), first), highlight=False, soft_wrap=True
            )
            for line in rest:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
