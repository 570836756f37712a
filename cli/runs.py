"""`raven runs ...`: create, inspect, follow and cancel training runs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cli.client import UNARY_TIMEOUT_S, Clients, connect, err_console, exit_on_rpc_error
from cli.downloads import DownloadMismatch, download
from cli.render import event_text, run_details, runs_table, state_text
from cli.requests import create_request
from cli.requests import run_name as to_run_name
from cli.review import metrics_plot, metrics_table
from cli.watch import watch_run
from shared.proto.raven.training.v1 import training_run_pb2

app = typer.Typer(help="Training runs.", no_args_is_help=True)
console = Console()

State = training_run_pb2.TrainingRun.State


class RunState(StrEnum):
    queued = "queued"
    preparing = "preparing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


def exit_for(run: training_run_pb2.TrainingRun) -> None:
    """Exit status of a watched run: 0 when it succeeded."""
    if run.state == State.SUCCEEDED:
        return
    if run.failure.reason:
        console.print(f"[red]{run.failure.reason}[/]: {run.failure.message}", highlight=False)
    raise typer.Exit(1)


@app.command()
@exit_on_rpc_error
def create(
    name: Annotated[str, typer.Option("--name", help="Display name of the run.")],
    dataset: Annotated[
        str, typer.Option(help="COCO annotation file: a path, file:// or s3:// URI.")
    ],
    image_root: Annotated[
        str | None,
        typer.Option(
            help="Folder (path, file:// or s3:// URI) the images' file_name are relative to; "
            "default: the annotation file's folder, or the images/ folder beside it."
        ),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="trainedModels/ID to fine-tune from.")
    ] = None,
    architecture: Annotated[
        str | None, typer.Option(help="Catalog key, e.g. retinanet_r18_fpn.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    frozen_stages: Annotated[int | None, typer.Option(min=-1, max=4)] = None,
    image_size: Annotated[int | None, typer.Option(min=1)] = None,
    val_fraction: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Held out for one test evaluation; 0: none."),
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    request_id: Annotated[
        str | None, typer.Option(help="UUID; repeating it returns the original run.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the run until it ends.")] = False,
) -> None:
    """Queue a training run."""
    if base_model and architecture:
        raise typer.BadParameter("give --base-model or --architecture, not both")
    request = create_request(
        display_name=name,
        dataset=dataset,
        image_root=image_root,
        base_model=base_model,
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        frozen_stages=frozen_stages,
        image_size=image_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        request_id=request_id,
    )
    with connect() as clients:
        run = clients.runs.CreateTrainingRun(request, timeout=UNARY_TIMEOUT_S)
        console.print(run_details(run))
        if watch:
            exit_for(watch_run(clients, run.name, console=console))


@app.command()
@exit_on_rpc_error
def get(name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")]) -> None:
    """Show a run."""
    with connect() as clients:
        run = clients.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=to_run_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    console.print(run_details(run))


@app.command("list")
@exit_on_rpc_error
def list_runs(
    state: Annotated[
        list[RunState] | None, typer.Option(help="Only runs in this state (repeatable).")
    ] = None,
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 0,
    page_token: Annotated[str, typer.Option()] = "",
) -> None:
    """List runs, newest first."""
    request = training_run_pb2.ListTrainingRunsRequest(
        page_size=page_size,
        page_token=page_token,
        # Enum fields take their value names.
        states=[s.value.upper() for s in state or []],
    )
    with connect() as clients:
        response = clients.runs.ListTrainingRuns(request, timeout=UNARY_TIMEOUT_S)
    console.print(runs_table(list(response.training_runs)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}", highlight=False)


@app.command()
@exit_on_rpc_error
def watch(
    name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")],
    after_sequence: Annotated[int, typer.Option(min=0, help="Skip events up to this one.")] = 0,
) -> None:
    """Follow a run live until it ends; exits 1 if it failed or was cancelled."""
    with connect() as clients:
        run = watch_run(clients, to_run_name(name), after_sequence=after_sequence, console=console)
    console.print(state_text(run.state))
    exit_for(run)


@app.command()
@exit_on_rpc_error
def cancel(
    name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")],
    reason: Annotated[str, typer.Option(help="Recorded on the run.")] = "",
) -> None:
    """Ask a run to stop."""
    with connect() as clients:
        run = clients.runs.CancelTrainingRun(
            training_run_pb2.CancelTrainingRunRequest(name=to_run_name(name), reason=reason),
            timeout=UNARY_TIMEOUT_S,
        )
    console.print(Text.assemble(f"{run.name} ", state_text(run.state)))


@app.command()
@exit_on_rpc_error
def events(name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")]) -> None:
    """The run's history, oldest first."""
    request = training_run_pb2.ListTrainingRunEventsRequest(name=to_run_name(name), page_size=500)
    with connect() as clients:
        for event in _all_events(clients, request):
            console.print(event_text(event))


def _all_events(
    clients: Clients, request: training_run_pb2.ListTrainingRunEventsRequest
) -> list[training_run_pb2.TrainingRunEvent]:
    found: list[training_run_pb2.TrainingRunEvent] = []
    while True:
        response = clients.runs.ListTrainingRunEvents(request, timeout=UNARY_TIMEOUT_S)
        found.extend(response.events)
        if not response.next_page_token:
            return found
        request.page_token = response.next_page_token


@app.command()
@exit_on_rpc_error
def metrics(
    name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")],
    plot: Annotated[bool, typer.Option(help="Draw loss and mAP per epoch.")] = True,
) -> None:
    """Per-epoch losses, learning rate and val mAP (the best epoch marked *), and a plot."""
    with connect() as clients:
        found = clients.runs.GetTrainingRunMetrics(
            training_run_pb2.GetTrainingRunMetricsRequest(name=to_run_name(name)),
            timeout=UNARY_TIMEOUT_S,
        )
    if not found.epochs:
        console.print("no epoch has ended yet", highlight=False)
        return
    console.print(metrics_table(found))
    drawn = metrics_plot(list(found.epochs), width=min(console.width, 100))
    if plot and drawn:
        console.print(Text(drawn))


@app.command()
@exit_on_rpc_error
def report(
    name: Annotated[str, typer.Argument(help="trainingRuns/ID or ID.")],
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
                console.print(str(path), highlight=False)
        except DownloadMismatch as error:
            err_console.print(f"error {error}", highlight=False)
            raise typer.Exit(1) from None
