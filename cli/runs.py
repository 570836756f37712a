"""`raven runs ...`: create, inspect, follow, change, retry, cancel and delete training runs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2
from rich.text import Text

from cli.client import UNARY_TIMEOUT_S, Clients, connect, err_console, exit_on_rpc_error
from cli.create import create, labels_option
from cli.downloads import DownloadMismatch, download
from cli.output import Format, OutputOption, console, emit
from cli.render import events_text, run_details, runs_table, state_text
from cli.requests import model_name as to_model_name
from cli.requests import run_name as to_run_name
from cli.review import metrics_view
from cli.watch import exit_for, watch_run
from shared.proto.raven.training.v1 import training_run_pb2

app = typer.Typer(help="Training runs.", no_args_is_help=True, rich_markup_mode=None)
app.command()(create)

State = training_run_pb2.TrainingRun.State
RunName = Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")]


class RunState(StrEnum):
    queued = "queued"
    preparing = "preparing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


class RunKind(StrEnum):
    training = "training"
    evaluation = "evaluation"


@app.command()
@exit_on_rpc_error
def get(name: RunName, output: OutputOption = Format.table) -> None:
    """Show a run."""
    with connect() as clients:
        run = clients.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=to_run_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(run, run_details, output)


@app.command("list")
@exit_on_rpc_error
def list_runs(
    state: Annotated[
        list[RunState] | None, typer.Option(help="Only runs in this state (repeatable).")
    ] = None,
    kind: Annotated[
        list[RunKind] | None,
        typer.Option(help="Jobs of this kind (repeatable); default: training."),
    ] = None,
    base_model: Annotated[str, typer.Option(help="Only fine-tunes of this model.")] = "",
    dataset: Annotated[str, typer.Option(help="Only runs on this dataset URI.")] = "",
    creator: Annotated[str, typer.Option(help="Only runs by this identity.")] = "",
    oldest_first: Annotated[bool, typer.Option("--oldest-first")] = False,
    page_size: Annotated[int, typer.Option(min=0, max=1000, help="0: the server's 50.")] = 0,
    page_token: Annotated[str, typer.Option()] = "",
    output: OutputOption = Format.table,
) -> None:
    """List runs, newest first."""
    request = training_run_pb2.ListTrainingRunsRequest(
        page_size=page_size,
        page_token=page_token,
        # Enum fields take their value names.
        states=[s.value.upper() for s in state or []],
        kinds=[k.value.upper() for k in kind or []],
        base_model=to_model_name(base_model) if base_model else "",
        dataset_uri=dataset,
        creator=creator,
        order_by="create_time" if oldest_first else "",
    )
    with connect() as clients:
        response = clients.runs.ListTrainingRuns(request, timeout=UNARY_TIMEOUT_S)
    emit(response, lambda r: runs_table(list(r.training_runs), r.next_page_token), output)


@app.command()
@exit_on_rpc_error
def watch(
    name: RunName,
    after_sequence: Annotated[int, typer.Option(min=0, help="Skip events up to this one.")] = 0,
) -> None:
    """Follow a run live until it ends; exits 1 if it failed or was cancelled."""
    out = console()
    with connect() as clients:
        run = watch_run(clients, to_run_name(name), after_sequence=after_sequence, console=out)
    out.print(state_text(run.state))
    exit_for(run)


@app.command()
@exit_on_rpc_error
def cancel(
    name: RunName,
    reason: Annotated[str, typer.Option(help="Recorded on the run.")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Ask a run to stop."""
    with connect() as clients:
        run = clients.runs.CancelTrainingRun(
            training_run_pb2.CancelTrainingRunRequest(name=to_run_name(name), reason=reason),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(run, lambda r: Text.assemble(f"{r.name} ", state_text(r.state)), output)


@app.command()
@exit_on_rpc_error
def retry(
    name: RunName,
    request_id: Annotated[
        str | None, typer.Option(help="UUID; repeating it returns the same new run.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the new run.")] = False,
    output: OutputOption = Format.table,
) -> None:
    """Start a new run with the spec of a FAILED or CANCELLED one."""
    import uuid

    with connect() as clients:
        run = clients.runs.RetryTrainingRun(
            training_run_pb2.RetryTrainingRunRequest(
                name=to_run_name(name), request_id=request_id or str(uuid.uuid4())
            ),
            timeout=UNARY_TIMEOUT_S,
        )
        emit(run, run_details, output)
        if watch:
            exit_for(watch_run(clients, run.name, console=console()))


@app.command()
@exit_on_rpc_error
def update(
    name: RunName,
    display_name: Annotated[str | None, typer.Option(help="A new display name.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE, repeatable: the run's labels become these.", metavar="KEY=VALUE"
        ),
    ] = None,
    clear_labels: Annotated[
        bool, typer.Option("--clear-labels", help="Remove every label.")
    ] = False,
    etag: Annotated[str, typer.Option(help="Refuse if the run changed since.")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Change a run's display name or labels."""
    run = training_run_pb2.TrainingRun(name=to_run_name(name), etag=etag)
    paths: list[str] = []
    if display_name is not None:
        run.display_name = display_name
        paths.append("display_name")
    if label or clear_labels:
        run.labels.update(labels_option(label))
        paths.append("labels")
    if not paths:
        raise typer.BadParameter(
            "nothing to change: give --display-name, --label or --clear-labels"
        )
    with connect() as clients:
        updated = clients.runs.UpdateTrainingRun(
            training_run_pb2.UpdateTrainingRunRequest(
                training_run=run, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(updated, run_details, output)


@app.command()
@exit_on_rpc_error
def delete(
    name: RunName,
    etag: Annotated[str, typer.Option(help="Refuse if the run changed since.")] = "",
) -> None:
    """Delete a finished run and its history (its model stays in the registry)."""
    run_name = to_run_name(name)
    with connect() as clients:
        clients.runs.DeleteTrainingRun(
            training_run_pb2.DeleteTrainingRunRequest(name=run_name, etag=etag),
            timeout=UNARY_TIMEOUT_S,
        )
    console().print(f"{run_name} deleted", highlight=False)


@app.command()
@exit_on_rpc_error
def events(name: RunName, output: OutputOption = Format.table) -> None:
    """The run's history, oldest first."""
    request = training_run_pb2.ListTrainingRunEventsRequest(name=to_run_name(name), page_size=500)
    with connect() as clients:
        found = _all_events(clients, request)
    emit(found, events_text, output)


def _all_events(
    clients: Clients, request: training_run_pb2.ListTrainingRunEventsRequest
) -> training_run_pb2.ListTrainingRunEventsResponse:
    found = training_run_pb2.ListTrainingRunEventsResponse()
    while True:
        response = clients.runs.ListTrainingRunEvents(request, timeout=UNARY_TIMEOUT_S)
        found.events.extend(response.events)
        if not response.next_page_token:
            return found
        request.page_token = response.next_page_token


@app.command()
@exit_on_rpc_error
def metrics(
    name: RunName,
    plot: Annotated[bool, typer.Option(help="Draw loss and mAP per epoch.")] = True,
    output: OutputOption = Format.table,
) -> None:
    """Per-epoch losses, learning rate and val mAP (the best epoch marked *), and a plot."""
    with connect() as clients:
        found = clients.runs.GetTrainingRunMetrics(
            training_run_pb2.GetTrainingRunMetricsRequest(name=to_run_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    width = min(console().width, 100)
    emit(found, lambda m: metrics_view(m, plot=plot, width=width), output)


@app.command()
@exit_on_rpc_error
def report(
    name: RunName,
    out: Annotated[Path, typer.Option(help="Folder to write the report into.")] = Path("."),
) -> None:
    """Download the run's training report (HTML with its plots), verified by sha256."""
    run_name = to_run_name(name)
    with connect() as clients:
        run = clients.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=run_name), timeout=UNARY_TIMEOUT_S
        )
        wanted = [a.name or a.kind for a in run.artifacts if a.kind in ("report", "plot")]
        if not wanted:
            err_console.print(f"{run_name} has no report (yet)", highlight=False)
            raise typer.Exit(1)
        try:
            for artifact in wanted:
                _, path = download(clients, run_name, artifact, out)
                console().print(str(path), highlight=False)
        except DownloadMismatch as error:
            err_console.print(f"error {error}", highlight=False)
            raise typer.Exit(1) from None
