"""`raven models ...`: the registry of trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf import field_mask_pb2
from rich.console import RenderableType

from cli.client import UNARY_TIMEOUT_S, Clients, connect, err_console, exit_on_rpc_error
from cli.create import labels_option
from cli.downloads import DownloadMismatch, download
from cli.evaluations import cancel_evaluation, compare, evaluate, evaluation, evaluations
from cli.importing import import_model
from cli.output import Format, OutputOption, console, emit
from cli.publication import publications, publish, unpublish
from cli.render import lineage_from_models, lineage_tree, model_details, models_table
from cli.requests import model_name as to_model_name
from cli.requests import run_name as to_run_name
from shared.proto.raven.training.v1 import trained_model_pb2

app = typer.Typer(help="Trained models.", no_args_is_help=True, rich_markup_mode=None)
for command in (evaluate, evaluations, evaluation, compare, publish, unpublish, publications):
    app.command()(command)
app.command("import")(import_model)
app.command("cancel-evaluation")(cancel_evaluation)

ModelName = Annotated[str, typer.Argument(help="trainedModels/ID or ID.")]

# A lineage deeper than this is a cycle in the data, not a family tree.
MAX_LINEAGE_DEPTH = 100


@app.command()
@exit_on_rpc_error
def get(name: ModelName, output: OutputOption = Format.table) -> None:
    """Show a model."""
    with connect() as clients:
        model = clients.models.GetTrainedModel(
            trained_model_pb2.GetTrainedModelRequest(name=to_model_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(model, model_details, output)


@app.command("list")
@exit_on_rpc_error
def list_models(
    training_run: Annotated[str, typer.Option(help="Only the model of this run.")] = "",
    base_model: Annotated[str, typer.Option(help="Only models fine-tuned from this one.")] = "",
    published: Annotated[
        bool | None, typer.Option("--published/--unpublished", help="Only (un)published ones.")
    ] = None,
    architecture: Annotated[str, typer.Option(help="Only of this architecture.")] = "",
    class_name: Annotated[str, typer.Option("--class", help="Only models detecting it.")] = "",
    dataset: Annotated[str, typer.Option(help="Only trained on this dataset URI.")] = "",
    creator: Annotated[str, typer.Option(help="Only by this identity.")] = "",
    best_first: Annotated[bool, typer.Option("--best-first", help="By coco/bbox_mAP.")] = False,
    page_size: Annotated[int, typer.Option(min=0, max=1000, help="0: the server's 50.")] = 0,
    page_token: Annotated[str, typer.Option()] = "",
    output: OutputOption = Format.table,
) -> None:
    """List models, newest first."""
    request = trained_model_pb2.ListTrainedModelsRequest(
        page_size=page_size,
        page_token=page_token,
        training_run=to_run_name(training_run) if training_run else "",
        base_model=to_model_name(base_model) if base_model else "",
        architecture=architecture,
        class_name=class_name,
        dataset_uri=dataset,
        creator=creator,
        order_by="coco/bbox_mAP desc" if best_first else "",
    )
    if published is not None:
        request.published = published
    with connect() as clients:
        response = clients.models.ListTrainedModels(request, timeout=UNARY_TIMEOUT_S)
    emit(response, lambda r: models_table(list(r.trained_models), r.next_page_token), output)


@app.command()
@exit_on_rpc_error
def lineage(
    name: ModelName,
    depth: Annotated[
        int, typer.Option(min=0, max=100, help="Generations of descendants; 0: 3.")
    ] = 0,
    output: OutputOption = Format.table,
) -> None:
    """Ancestors up to the root model, and descendants."""
    model = to_model_name(name)
    with connect() as clients:
        found = lineage_of(clients, model, depth)
    emit(found, lambda f: lineage_tree(f, model), output)


def lineage_view(clients: Clients, name: str) -> RenderableType:
    return lineage_tree(lineage_of(clients, name), name)


def lineage_of(
    clients: Clients, name: str, depth: int = 0
) -> trained_model_pb2.TrainedModelLineage:
    """GetTrainedModelLineage, or a walk over base_model links where the server lacks it."""
    try:
        found: trained_model_pb2.TrainedModelLineage = clients.models.GetTrainedModelLineage(
            trained_model_pb2.GetTrainedModelLineageRequest(name=name, descendant_depth=depth),
            timeout=UNARY_TIMEOUT_S,
        )
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return lineage_from_models(_walk_ancestors(clients, name))
    return found


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
    console().print(
        f"{path} ({announced.size_bytes} bytes, sha256 {announced.sha256})", highlight=False
    )


@app.command()
@exit_on_rpc_error
def update(
    name: ModelName,
    display_name: Annotated[str | None, typer.Option(help="A new display name.")] = None,
    description: Annotated[str | None, typer.Option(help="A new description.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE, repeatable: the labels become these.", metavar="KEY=VALUE"),
    ] = None,
    clear_labels: Annotated[
        bool, typer.Option("--clear-labels", help="Remove every label.")
    ] = False,
    etag: Annotated[str, typer.Option(help="Refuse if the model changed since.")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Change a model's display name, description or labels."""
    model = trained_model_pb2.TrainedModel(name=to_model_name(name), etag=etag)
    paths: list[str] = []
    if display_name is not None:
        model.display_name = display_name
        paths.append("display_name")
    if description is not None:
        model.description = description
        paths.append("description")
    if label or clear_labels:
        model.labels.update(labels_option(label))
        paths.append("labels")
    if not paths:
        raise typer.BadParameter(
            "nothing to change: give --display-name, --description, --label or --clear-labels"
        )
    with connect() as clients:
        updated = clients.models.UpdateTrainedModel(
            trained_model_pb2.UpdateTrainedModelRequest(
                trained_model=model, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(updated, model_details, output)


@app.command()
@exit_on_rpc_error
def delete(
    name: ModelName,
    etag: Annotated[str, typer.Option(help="Refuse if the model changed since.")] = "",
) -> None:
    """Delete a model, its files and its evaluations (refused while it is published or a
    run fine-tunes it)."""
    model = to_model_name(name)
    with connect() as clients:
        clients.models.DeleteTrainedModel(
            trained_model_pb2.DeleteTrainedModelRequest(name=model, etag=etag),
            timeout=UNARY_TIMEOUT_S,
        )
    console().print(f"{model} deleted", highlight=False)
