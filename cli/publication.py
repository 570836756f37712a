"""`raven models publish|unpublish|publications`: governed publication to channels."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import UNARY_TIMEOUT_S, connect, exit_on_rpc_error
from cli.render import timestamp
from cli.requests import model_name as to_model_name
from shared.metrics import MAP
from shared.proto.raven.training.v1 import trained_model_pb2

console = Console()


@exit_on_rpc_error
def publish(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")],
    channel: Annotated[str, typer.Option(help="The channel it serves.")] = "production",
    reason: Annotated[str, typer.Option(help="Recorded on the publication.")] = "",
    min_map: Annotated[
        float | None, typer.Option(min=0, max=1, help=f"Refuse unless its {MAP} is at least this.")
    ] = None,
    beat_incumbent: Annotated[
        bool | None,
        typer.Option(
            "--beat-incumbent/--no-beat-incumbent",
            help="Refuse unless it is not worse than the channel's model on the same images; "
            "default: the server's policy.",
        ),
    ] = None,
    incumbent_metric: Annotated[str, typer.Option(help="The metric compared.")] = MAP,
    tolerance: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="How much worse it may be; default: the server's."),
    ] = None,
    etag: Annotated[str, typer.Option(help="Refuse if the model changed since.")] = "",
) -> None:
    """Publish a model to a channel, replacing the model published there."""
    request = trained_model_pb2.PublishTrainedModelRequest(
        name=to_model_name(name),
        channel=channel,
        reason=reason,
        etag=etag,
        incumbent_metric=incumbent_metric,
    )
    if min_map is not None:
        request.min_bbox_map = min_map
    if beat_incumbent is not None:
        request.beat_incumbent = beat_incumbent
    if tolerance is not None:
        request.incumbent_tolerance = tolerance
    with connect() as clients:
        model = clients.models.PublishTrainedModel(request, timeout=UNARY_TIMEOUT_S)
        latest = clients.models.ListPublicationEvents(
            trained_model_pb2.ListPublicationEventsRequest(
                trained_model=model.name, channel=channel, page_size=1
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    console.print(f"{model.name} published to {model.publication.channel}", highlight=False)
    for event in latest.events:
        if event.HasField("incumbent_comparison"):
            console.print(comparison_text(event.incumbent_comparison))


@exit_on_rpc_error
def unpublish(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")],
    reason: Annotated[str, typer.Option(help="Recorded on the publication history.")] = "",
    etag: Annotated[str, typer.Option(help="Refuse if the model changed since.")] = "",
) -> None:
    """Take a model out of its channel."""
    with connect() as clients:
        model = clients.models.UnpublishTrainedModel(
            trained_model_pb2.UnpublishTrainedModelRequest(
                name=to_model_name(name), reason=reason, etag=etag
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    console.print(f"{model.name} unpublished", highlight=False)


@exit_on_rpc_error
def publications(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID; - for every model.")] = "-",
    channel: Annotated[str, typer.Option(help="Only this channel.")] = "",
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 0,
    page_token: Annotated[str, typer.Option()] = "",
) -> None:
    """The publication history, newest first."""
    request = trained_model_pb2.ListPublicationEventsRequest(
        trained_model="" if name == "-" else to_model_name(name),
        channel=channel,
        page_size=page_size,
        page_token=page_token,
    )
    with connect() as clients:
        response = clients.models.ListPublicationEvents(request, timeout=UNARY_TIMEOUT_S)
    console.print(publications_table(list(response.events)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}", highlight=False)


def comparison_text(comparison: trained_model_pb2.IncumbentComparison) -> Text:
    margin = comparison.candidate_value - comparison.incumbent_value
    return Text(
        f"{comparison.metric} {comparison.candidate_value:.3f} against the incumbent's "
        f"{comparison.incumbent_value:.3f} ({margin:+.3f}, tolerance {comparison.tolerance:g}); "
        f"evaluations {comparison.candidate_evaluation} and {comparison.incumbent_evaluation}"
    )


def publications_table(events: list[trained_model_pb2.PublicationEvent]) -> Table:
    table = Table(
        "time", "action", "channel", "model", "replaced", "actor", "mAP", "reason",
        box=box.SIMPLE_HEAD,
    )  # fmt: skip
    for event in events:
        table.add_row(
            timestamp(event.time),
            event.action,
            event.channel,
            event.trained_model.removeprefix("trainedModels/"),
            event.replaced_model.removeprefix("trainedModels/"),
            event.actor,
            "" if not event.HasField("bbox_map") else f"{event.bbox_map:.3f}",
            Text(event.reason),
        )
    return table
