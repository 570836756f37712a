"""`raven audit ...`: the audit trail (admins), and the development certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.client import UNARY_TIMEOUT_S, connect, exit_on_rpc_error
from cli.render import timestamp
from shared.proto.raven.training.v1 import audit_pb2

app = typer.Typer(
    help="The audit trail of state changes and refused calls.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console()


@app.command("list")
@exit_on_rpc_error
def list_records(
    identity: Annotated[str, typer.Option(help="Only calls by this SPIFFE id.")] = "",
    rpc: Annotated[str, typer.Option(help="Only this full method name.")] = "",
    outcome: Annotated[str, typer.Option(help="OK, PERMISSION_DENIED, ...")] = "",
    resource: Annotated[str, typer.Option(help="Only calls on this resource.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
) -> None:
    """Newest first. Needs `admin`."""
    with connect() as clients:
        response = clients.audit.ListAuditRecords(
            audit_pb2.ListAuditRecordsRequest(
                identity=identity, rpc=rpc, outcome=outcome, resource=resource, page_size=limit
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    table = Table("time", "identity", "on behalf of", "rpc", "resource", "outcome", "detail")
    for record in response.audit_records:
        table.add_row(
            timestamp(record.time),
            record.identity,
            record.on_behalf_of,
            record.rpc.rsplit("/", 1)[-1],
            record.resource,
            record.outcome,
            record.detail,
        )
    console.print(table)


def certs(
    directory: Annotated[
        Path | None, typer.Option(help="Where to write them (default: RAVEN_DEV_CERTS_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing certificates.")] = False,
) -> None:
    """Create the development CA, server and CLI certificates and policy (`make certs`)."""
    from shared.auth.certs import ensure_dev_certs
    from shared.settings import Settings

    dev, created = ensure_dev_certs(directory or Settings().dev_certs_dir, force=force)
    console.print("created" if created else "already there", style="bold")
    console.print(f"CA            {dev.ca}", highlight=False)
    console.print(
        f"server        {dev.server.cert}  ({dev.server_id})", highlight=False, soft_wrap=True
    )
    console.print(f"CLI client    {dev.cli.cert}  ({dev.cli_id})", highlight=False, soft_wrap=True)
    console.print(f"policy        {dev.policy}", highlight=False)
