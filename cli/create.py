"""`raven runs create`: every field of a training spec as an option. Unset options stay
unset, so the server fills in its defaults and records them on the run; the help names
them (`raven architectures` shows those that depend on the architecture)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from cli.client import UNARY_TIMEOUT_S, connect, exit_on_rpc_error
from cli.output import Format, OutputOption, console, emit
from cli.render import run_details
from cli.requests import create_request, labels
from cli.watch import exit_for, watch_run
from shared import catalog


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Optimizer(StrEnum):
    sgd = "sgd"
    adamw = "adamw"


def labels_option(pairs: list[str] | None) -> dict[str, str]:
    try:
        return labels(pairs)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--label") from None


def _enum(value: StrEnum | None) -> str | None:
    return value.value.upper() if value is not None else None


@exit_on_rpc_error
def create(
    name: Annotated[str, typer.Option("--name", help="Display name of the run.")],
    dataset: Annotated[
        str, typer.Option(help="COCO annotation file: a path, file:// or s3:// URI.")
    ],
    image_root: Annotated[
        str | None,
        typer.Option(
            help="Folder (path, file:// or s3:// URI) the images' file_name are relative to. "
            "Default: the annotation file's folder, or the images/ folder beside it."
        ),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="trainedModels/ID to fine-tune from.")
    ] = None,
    architecture: Annotated[
        str | None,
        typer.Option(help="Catalog key (`raven architectures`). Default: the base model's."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help=f"Default {catalog.DEFAULT_EPOCHS}.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help=f"Images per step. Default {catalog.DEFAULT_BATCH_SIZE}."),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(min=0.0, help="Default: the architecture's, scaled to the batch size."),
    ] = None,
    optimizer: Annotated[
        Optimizer | None, typer.Option(help="Default: the architecture's recipe.")
    ] = None,
    warmup_iterations: Annotated[
        int | None,
        typer.Option(
            min=0, help="Linear warm-up; 0: none. Default: a tenth of the run, at most 500."
        ),
    ] = None,
    frozen_stages: Annotated[
        int | None,
        typer.Option(
            min=-1, max=4, help="Backbone stages kept frozen, -1 none. Default: the recipe's."
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1, help=f"Square images are resized into. Default {catalog.DEFAULT_IMAGE_SIZE}."
        ),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option("--augment/--no-augment", help="Random horizontal flips. Default on."),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help=f"Default {catalog.DEFAULT_VAL_FRACTION}."),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Held out for one test evaluation. Default 0: none."),
    ] = None,
    val_interval: Annotated[
        int | None,
        typer.Option(
            min=1, help=f"Validate every N epochs. Default {catalog.DEFAULT_VAL_INTERVAL}."
        ),
    ] = None,
    early_stopping_patience: Annotated[
        int | None,
        typer.Option(
            min=0, help="Stop after N validations without a better mAP. Default 0: never."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Default: drawn, and recorded.")] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic", help="Reproducible, slower. Default off."
        ),
    ] = None,
    device: Annotated[Device | None, typer.Option(help="Default auto.")] = None,
    gpu_count: Annotated[
        int | None, typer.Option(min=1, help="GPUs per run on a GPU. Default 1.")
    ] = None,
    mixed_precision: Annotated[
        bool | None,
        typer.Option(
            "--mixed-precision/--no-mixed-precision", help="Default: on with CUDA, off on CPU."
        ),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE, repeatable.", metavar="KEY=VALUE")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option(help="UUID; repeating it returns the original run.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the run until it ends.")] = False,
    output: OutputOption = Format.table,
) -> None:
    """Queue a training run. Unset options take the server's defaults, recorded on the run."""
    if base_model and architecture:
        raise typer.BadParameter("give --base-model or --architecture, not both")
    request = create_request(
        display_name=name,
        dataset=dataset,
        image_root=image_root,
        base_model=base_model,
        architecture=architecture,
        request_id=request_id,
        labels=labels_option(label),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=_enum(optimizer),
        warmup_iterations=warmup_iterations,
        frozen_stages=frozen_stages,
        image_size=image_size,
        augment=augment,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        val_interval=val_interval,
        early_stopping_patience=early_stopping_patience,
        seed=seed,
        deterministic=deterministic,
        device=_enum(device),
        gpu_count=gpu_count,
        mixed_precision=mixed_precision,
    )
    with connect() as clients:
        run = clients.runs.CreateTrainingRun(request, timeout=UNARY_TIMEOUT_S)
        emit(run, run_details, output)
        if watch:
            exit_for(watch_run(clients, run.name, console=console()))
