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
from cli.live import Throughput, images_per_iteration, progress_fields
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
EVALUATION = training_run_pb2.TrainingRun.EVALUATION
MAX_RESUMES = 30
# How long the end of a watch waits for the registry to name the run's model.
MODEL_WAIT_S = 10.0
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False, style="bold"),
        TextColumn("{task.fields[state]}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        MofNCompleteColumn(),
        TextColumn("eta {task.fields[eta]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[parts]}", markup=False, style="dim"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[speed]}"),
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
    console.print(
        Text.assemble(
            "watching ", (run.name, "bold"), f" ({run.display_name or run.spec.architecture})"
        )
    )
    last_sequence = after_sequence
    shown_iteration = -1
    resumes = 0
    speed = Throughput(images_per_iteration(run.spec))
    with _progress_bar(console) as bar:
        p = run.progress
        task = bar.add_task(
            run.display_name or run.name,
            total=p.max_iterations or None,
            completed=p.iteration,
            state=state_text(run.state),
            map=map_value(run.latest_evaluation),
            **progress_fields(p, None),
        )
        while True:
            try:
                request = training_run_pb2.WatchTrainingRunRequest(
                    name=name, after_sequence=last_sequence, live_progress=True
                )
                for event in clients.runs.WatchTrainingRun(request):
                    resumes = 0
                    if not event.live:
                        if event.sequence <= last_sequence:
                            continue
                        last_sequence = event.sequence
                    if event.HasField("progress"):
                        # Shown live already, or older than what was.
                        if event.progress.iteration <= shown_iteration:
                            continue
                        shown_iteration = event.progress.iteration
                    _show(bar, task, event, speed)
                # The server ends the stream when the run ends, or when it shuts down.
                run = clients.runs.GetTrainingRun(
                    training_run_pb2.GetTrainingRunRequest(name=name), timeout=UNARY_TIMEOUT_S
                )
                if run.state in TERMINAL_STATES:
                    bar.update(task, state=state_text(run.state))
                    break
                reason = "stream ended before the run did"
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code is None or code not in RESUMABLE or resumes >= MAX_RESUMES:
                    raise
                reason = f"stream dropped ({code.name})"
            delay = BACKOFF_S[min(resumes, len(BACKOFF_S) - 1)]
            resumes += 1
            bar.console.print(
                Text(
                    f"{reason}; resuming after sequence {last_sequence} in {delay:.1f}s",
                    style="yellow",
                )
            )
            time.sleep(delay)
    if run.state == training_run_pb2.TrainingRun.SUCCEEDED and run.kind != EVALUATION:
        model = trained_model_of(clients, run)
        console.print(
            Text.assemble("trained model ", (model, "bold green"))
            if model
            else Text(f"{run.name} succeeded; its model is not registered yet", style="yellow")
        )
    return run


def _show(
    bar: Progress, task_id: TaskID, event: training_run_pb2.TrainingRunEvent, speed: Throughput
) -> None:
    kind = event.WhichOneof("payload")
    if kind == "progress":
        p = event.progress
        rate = speed.update(at=event.time.ToNanoseconds() / 1e9, iteration=p.iteration)
        bar.update(
            task_id,
            total=p.max_iterations or None,
            completed=p.iteration,
            **progress_fields(p, rate),
        )
        return
    if kind == "state_changed":
        bar.update(task_id, state=state_text(event.state_changed.to_state))
    elif kind == "evaluation":
        bar.update(task_id, map=map_value(event.evaluation))
    bar.console.print(event_text(event))


def trained_model_of(
    clients: Clients, run: training_run_pb2.TrainingRun, *, wait_s: float = MODEL_WAIT_S
) -> str:
    """The model the registry made of a succeeded training run: it registers it from the
    run's result event, shortly after the run ended. Empty if none within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while not run.trained_model and time.monotonic() < deadline:
        time.sleep(0.25)
        run = clients.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=run.name), timeout=UNARY_TIMEOUT_S
        )
    return run.trained_model


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
