"""Follow a run live: a progress bar fed by WatchTrainingRun, resumed after a dropped stream."""

from __future__ import annotations

import time

import grpc
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from cli.client import UNARY_TIMEOUT_S, Clients, err_console
from cli.render import TERMINAL_STATES, event_text, map_value, state_text
from shared.proto.raven.training.v1 import training_run_pb2

# Codes after which the same stream, re-opened from the last sequence, can go on.
RESUMABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
})  # fmt: skip
MAX_RESUMES = 30
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[state]}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("mAP {task.fields[map]}"),
        TimeElapsedColumn(),
        console=console,
    )


def watch_run(
    clients: Clients, name: str, *, after_sequence: int = 0, console: Console | None = None
) -> training_run_pb2.TrainingRun:
    """Shows the run's events as they arrive until it ends; returns the ended run.

    A stream that drops (server restart, network) is re-opened after the last
    sequence seen, so no event is shown twice or lost.
    """
    console = console or Console()
    run: training_run_pb2.TrainingRun = clients.runs.GetTrainingRun(
        training_run_pb2.GetTrainingRunRequest(name=name), timeout=UNARY_TIMEOUT_S
    )
    console.print(f"watching [bold]{run.name}[/] ({run.display_name or run.spec.architecture})")
    last_sequence = after_sequence
    resumes = 0
    with _progress_bar(console) as bar:
        p = run.progress
        task = bar.add_task(
            run.display_name or run.name,
            total=p.max_iterations or None,
            completed=p.iteration,
            state=state_text(run.state),
            epoch=f"{p.epoch}/{p.max_epochs}" if p.max_epochs else "-",
            loss=f"{p.loss:.4f}" if p.loss else "-",
            map=map_value(run.latest_evaluation),
        )
        while True:
            try:
                request = training_run_pb2.WatchTrainingRunRequest(
                    name=name, after_sequence=last_sequence
                )
                for event in clients.runs.WatchTrainingRun(request):
                    resumes = 0
                    if event.sequence <= last_sequence:
                        continue
                    last_sequence = event.sequence
                    _show(bar, task, event)
                # The server ends the stream when the run ends, or when it shuts down.
                run = clients.runs.GetTrainingRun(
                    training_run_pb2.GetTrainingRunRequest(name=name), timeout=UNARY_TIMEOUT_S
                )
                if run.state in TERMINAL_STATES:
                    bar.update(task, state=state_text(run.state))
                    return run
                reason = "stream ended before the run did"
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code is None or code not in RESUMABLE or resumes >= MAX_RESUMES:
                    raise
                reason = f"stream dropped ({code.name})"
            delay = BACKOFF_S[min(resumes, len(BACKOFF_S) - 1)]
            resumes += 1
            bar.console.print(
                f"[yellow]{reason}; resuming after sequence {last_sequence} in {delay:.1f}s[/]"
            )
            time.sleep(delay)


def _show(bar: Progress, task_id: TaskID, event: training_run_pb2.TrainingRunEvent) -> None:
    kind = event.WhichOneof("payload")
    if kind == "progress":
        p = event.progress
        bar.update(
            task_id,
            total=p.max_iterations or None,
            completed=p.iteration,
            epoch=f"{p.epoch}/{p.max_epochs}",
            loss=f"{p.loss:.4f}",
        )
        return
    if kind == "state_changed":
        bar.update(task_id, state=state_text(event.state_changed.to_state))
    elif kind == "evaluation":
        bar.update(task_id, map=map_value(event.evaluation))
    bar.console.print(event_text(event))


def exit_for(run: training_run_pb2.TrainingRun) -> None:
    """Exit status of a watched run: 0 when it succeeded, else 1 after its failure."""
    if run.state == training_run_pb2.TrainingRun.SUCCEEDED:
        return
    if run.failure.reason:
        err_console.print(
            Text.assemble((run.failure.reason, "red"), f": {run.failure.message}"),
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(1)
