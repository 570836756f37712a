"""`raven models evaluate|evaluations|evaluation|compare`: model evaluations and
comparisons on equal images."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from cli.client import UNARY_TIMEOUT_S, connect, exit_on_rpc_error
from cli.output import Format, OutputOption, console, emit
from cli.render import next_page
from cli.requests import dataset_uri as to_dataset_uri
from cli.requests import model_name as to_model_name
from cli.requests import run_name as to_run_name
from cli.review import comparison_table, evaluation_details, evaluations_table
from cli.watch import watch_run
from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2


class Split(StrEnum):
    all = "all"
    train = "train"
    val = "val"
    test = "test"


def evaluation_name(model: str, evaluation: str) -> str:
    """`trainedModels/M/evaluations/E` from that, or from a model and a bare evaluation ID."""
    if evaluation.startswith("trainedModels/"):
        return evaluation
    return f"{to_model_name(model)}/evaluations/{evaluation}"


@exit_on_rpc_error
def evaluate(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")],
    dataset: Annotated[
        str, typer.Option(help="COCO annotation file (path, file:// or s3:// URI).")
    ] = "",
    image_root: Annotated[str, typer.Option(help="Folder the images are relative to.")] = "",
    split_of: Annotated[
        str, typer.Option(help="trainingRuns/ID: a split of that run's dataset, drawn as it was.")
    ] = "",
    split: Annotated[
        Split | None, typer.Option(help="Default: test with --split-of, else all.")
    ] = None,
    score_threshold: Annotated[
        float | None, typer.Option(min=0, max=1, help="Default 0.5.")
    ] = None,
    iou_threshold: Annotated[float | None, typer.Option(min=0, max=1, help="Default 0.5.")] = None,
    samples: Annotated[
        int | None, typer.Option(min=0, max=10, help="Worst and best images drawn; default 3.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow it until it ends.")] = False,
    output: OutputOption = Format.table,
) -> None:
    """Evaluate a model on a dataset, or on a split of a run's dataset.

    COCO metrics, PR curves, a confusion matrix, TP/FP/FN per class and the images it gets
    most wrong; --watch follows the job until it ends (exit 1 unless it succeeded).
    """
    request = trained_model_pb2.EvaluateTrainedModelRequest(
        trained_model=to_model_name(name),
        dataset_uri=to_dataset_uri(dataset) if dataset else "",
        image_root=image_root,
        split_of=to_run_name(split_of) if split_of else "",
        split=split.value if split else "",
    )
    if score_threshold is not None:
        request.score_threshold = score_threshold
    if iou_threshold is not None:
        request.iou_threshold = iou_threshold
    if samples is not None:
        request.samples = samples
    with connect() as clients:
        evaluation = clients.models.EvaluateTrainedModel(request, timeout=UNARY_TIMEOUT_S)
        if not watch:
            emit(evaluation, evaluation_details, output)
            return
        if output is Format.table:
            emit(evaluation, evaluation_details, output)
        job = watch_run(clients, evaluation.job, console=console(err=output is not Format.table))
        evaluation = clients.models.GetModelEvaluation(
            trained_model_pb2.GetModelEvaluationRequest(name=evaluation.name),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(evaluation, evaluation_details, output)
    if job.state != training_run_pb2.TrainingRun.SUCCEEDED:
        raise typer.Exit(1)


@exit_on_rpc_error
def evaluations(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID; - for every model.")],
    dataset: Annotated[str, typer.Option(help="Only on this dataset fingerprint.")] = "",
    split: Annotated[Split | None, typer.Option(help="Only of this split.")] = None,
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 0,
    page_token: Annotated[str, typer.Option()] = "",
    output: OutputOption = Format.table,
) -> None:
    """List a model's evaluations, newest first."""
    request = trained_model_pb2.ListModelEvaluationsRequest(
        trained_model=to_model_name(name),
        dataset_fingerprint=dataset,
        split=split.value if split else "",
        page_size=page_size,
        page_token=page_token,
    )
    with connect() as clients:
        response = clients.models.ListModelEvaluations(request, timeout=UNARY_TIMEOUT_S)
    emit(
        response,
        lambda r: next_page(evaluations_table(list(r.evaluations)), r.next_page_token),
        output,
    )


@exit_on_rpc_error
def evaluation(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")],
    evaluation_id: Annotated[str, typer.Argument(help="The evaluation's ID, or its full name.")],
    output: OutputOption = Format.table,
) -> None:
    """Show an evaluation: metrics, per-class AP and TP/FP/FN, confusion matrix, samples."""
    with connect() as clients:
        found = clients.models.GetModelEvaluation(
            trained_model_pb2.GetModelEvaluationRequest(name=evaluation_name(name, evaluation_id)),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(found, evaluation_details, output)


@exit_on_rpc_error
def compare(
    names: Annotated[list[str], typer.Argument(help="Two or more trainedModels/ID or ID.")],
    dataset: Annotated[str, typer.Option(help="Dataset fingerprint the models were evaluated on.")],
    split: Annotated[Split, typer.Option(help="The split evaluated.")] = Split.test,
    output: OutputOption = Format.table,
) -> None:
    """Metrics side by side, from evaluations on the same images only."""
    request = trained_model_pb2.CompareTrainedModelsRequest(
        trained_models=[to_model_name(n) for n in names],
        dataset_fingerprint=dataset,
        split=split.value,
    )
    with connect() as clients:
        comparison = clients.models.CompareTrainedModels(request, timeout=UNARY_TIMEOUT_S)
    emit(comparison, comparison_table, output)


@exit_on_rpc_error
def cancel_evaluation(
    name: Annotated[str, typer.Argument(help="trainedModels/ID or ID.")],
    evaluation_id: Annotated[str, typer.Argument(help="The evaluation's ID, or its full name.")],
    reason: Annotated[str, typer.Option(help="Recorded on its job.")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Stop an evaluation: a queued one at once, a running one at its next batch."""
    with connect() as clients:
        found = clients.models.CancelModelEvaluation(
            trained_model_pb2.CancelModelEvaluationRequest(
                name=evaluation_name(name, evaluation_id), reason=reason
            ),
            timeout=UNARY_TIMEOUT_S,
        )
    emit(found, evaluation_details, output)
