"""`raven models ...`: the registry of trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console, RenderableType

from cli.client import UNARY_TIMEOUT_S, Clients, connect, err_console, exit_on_rpc_error
from cli.downloads import DownloadMismatch, download
from cli.evaluations import compare, evaluate, evaluation, evaluations
from cli.publication import publications, publish, unpublish
from cli.render import lineage_from_models, lineage_tree, model_details, models_table
from cli.requests import model_name as to_model_name
from cli.requests import run_name as to_run_name
from shared.proto.raven.training.v1 import trained_model_pb2

app = typer.Typer(help="Trained models.", no_args_is_help=True)
console = Console()
for command in (evaluate, evaluations, evaluation, compare, publish, unpublish, publications):
    app.command()(command)

# A lineage deeper than this is a cycle in the data, not a family tree.
MAX_LINEAGE_DEPTH = 100


@app.command()
@exit_on_rpc_error
def get(name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")]) -> None:
    """Show a model."""
    with connect() as clients:
        model = clients.models.GetTrainedModel(
            trained_model_pb2.GetTrainedModelRequest(name=to_model_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    console.print(model_details(model))


@app.command("list")
@exit_on_rpc_error
def list_models(
    training_run: Annotated[str, typer.Option(help="Only the model of this run.")] = "",
    base_model: Annotated[str, typer.Option(help="Only models fine-tuned from this one.")] = "",
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 0,
    page_token: Annotated[str, typer.Option()] = "",
) -> None:
    """List models, newest first."""
    request = trained_model_pb2.ListTrainedModelsRequest(
        page_size=page_size,
        page_token=page_token,
        training_run=to_run_name(training_run) if training_run else "",
        base_model=to_model_name(base_model) if base_model else "",
    )
    with connect() as clients:
        response = clients.models.ListTrainedModels(request, timeout=UNARY_TIMEOUT_S)
    console.print(models_table(list(response.trained_models)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}", highlight=False)


@app.command()
@exit_on_rpc_error
def lineage(name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")]) -> None:
    """Ancestors up to the root model, and descendants."""
    with connect() as clients:
        console.print(lineage_view(clients, to_model_name(name)))


def lineage_view(clients: Clients, name: str) -> RenderableType:
    """GetTrainedModelLineage, or a walk over base_model links where the server lacks it."""
    try:
        found = clients.models.GetTrainedModelLineage(
            trained_model_pb2.GetTrainedModelLineageRequest(name=name), timeout=UNARY_TIMEOUT_S
        )
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        found = lineage_from_models(_walk_ancestors(clients, name))
    return lineage_tree(found, name)


def _walk_ancestors(clients: Clients, name: str) -> list[trained_model_pb2.TrainedModel]:
    chain: list[trained_model_pb2.TrainedModel] = []
    while name and len(chain) < MAX_LINEAGE_DEPTH:
        model = clients.models.GetTrainedModel(
            trained_model_pb2.GetTrainedModelRequest(name=name), timeout=UNARY_TIMEOUT_S
        )
        chain.append(model)
        name = model.base_model
    return chain


@app.command("download")
@exit_on_rpc_error
def download_artifact(
    parent: Annotated[
        str,
        typer.Argument(
            help="trainedModels/ID (or ID), trainingRuns/ID or trainedModels/M/evaluations/E."
        ),
    ],
    artifact: Annotated[
        str, typer.Argument(help="The artifact's name, or its kind.")
    ] = "checkpoint",
    out: Annotated[Path, typer.Option(help="Folder to write into.")] = Path("."),
) -> None:
    """Download any artifact of a model, run or evaluation, verified by its sha256."""
    name = parent if "/" in parent else to_model_name(parent)
    with connect() as clients:
        try:
            announced, path = download(clients, name, artifact, out)
        except DownloadMismatch as error:
            err_console.print(f"error {error}", highlight=False)
            raise typer.Exit(1) from None
    console.print(
        f"{path} ({announced.size_bytes} bytes, sha256 {announced.sha256})", highlight=False
    )
