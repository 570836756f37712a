"""`raven models import`: a root model from a config and a checkpoint, uploaded in chunks
or named by URI in the artifact store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from cli.client import connect, exit_on_rpc_error
from cli.create import labels_option
from cli.downloads import DOWNLOAD_TIMEOUT_S
from cli.output import Format, OutputOption, emit
from cli.render import model_details
from shared.proto.raven.training.v1 import trained_model_pb2

# Below gRPC's default 4 MiB message limit, with room for the envelope.
CHUNK_BYTES = 1 << 20

Request = trained_model_pb2.ImportTrainedModelRequest


def import_requests(
    metadata: Request.Metadata, config: Path | None, checkpoint: Path | None
) -> Iterator[Request]:
    """The metadata first, then the config's chunks, then the checkpoint's."""
    yield Request(metadata=metadata)
    if config is not None:
        yield from (Request(config_chunk=chunk) for chunk in _chunks(config))
    if checkpoint is not None:
        yield from (Request(checkpoint_chunk=chunk) for chunk in _chunks(checkpoint))


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


@exit_on_rpc_error
def import_model(
    architecture: Annotated[str, typer.Option(help="Catalog key (`raven architectures`).")],
    classes: Annotated[
        str, typer.Option(help="Class names in label order, comma-separated: dump,tire.")
    ],
    config: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="The mmdet config (.py) to upload."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="The checkpoint (.pth) to upload."),
    ] = None,
    config_uri: Annotated[
        str, typer.Option(help="Instead of --config: a config already in the artifact store.")
    ] = "",
    checkpoint_uri: Annotated[
        str, typer.Option(help="Instead of --checkpoint: a checkpoint in the artifact store.")
    ] = "",
    name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
    description: Annotated[str, typer.Option()] = "",
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE, repeatable.", metavar="KEY=VALUE")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option(help="UUID; repeating it returns the model it imported.")
    ] = None,
    output: OutputOption = Format.table,
) -> None:
    """Import a root model: its config is read as data (never run) and its checkpoint
    loaded with weights only, then checked against the architecture and classes."""
    if bool(config) == bool(config_uri) or bool(checkpoint) == bool(checkpoint_uri):
        raise typer.BadParameter(
            "give the config as --config or --config-uri, and the checkpoint as "
            "--checkpoint or --checkpoint-uri (one of each)"
        )
    metadata = Request.Metadata(
        display_name=name,
        description=description,
        labels=labels_option(label),
        architecture=architecture,
        classes=[c.strip() for c in classes.split(",") if c.strip()],
        config_uri=config_uri,
        checkpoint_uri=checkpoint_uri,
        request_id=request_id or str(uuid.uuid4()),
    )
    with connect() as clients:
        model = clients.models.ImportTrainedModel(
            import_requests(metadata, config, checkpoint), timeout=DOWNLOAD_TIMEOUT_S
        )
    emit(model, model_details, output)
