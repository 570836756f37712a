"""`raven demo` (`make run`): train a root model, fine-tune it, and show the lineage, live.

Everything goes through the public gRPC API, as any client would.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from cli import devstack
from cli.client import UNARY_TIMEOUT_S, Clients, client_tls, connect, exit_on_rpc_error
from cli.models import lineage_view
from cli.render import model_details, run_details
from cli.requests import create_request
from cli.watch import watch_run
from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2
from shared.settings import Settings

# Built to learn from scratch on small images: its mAP rises within the demo's minute or two.
ARCHITECTURE = "rtmdet_tiny"
# 96 of them train, 24 are held out for validation.
IMAGES = 120
# The model is registered from the run's result event after the run ends.
MODEL_WAIT_S = 120.0

console = Console()


def _say(message: str) -> None:
    console.print(message, highlight=False)


def _dataset(artifact_root: Path, name: str, *, seed: int) -> str:
    # Imported here: the synthetic generator needs numpy and PIL, no other command does.
    from trainer_worker.synthetic import make_dataset

    annotations = make_dataset(
        artifact_root / "datasets" / name, images=IMAGES, size=128, seed=seed
    )
    return annotations.resolve().as_uri()


def _wait_for_model(clients: Clients, run_name: str) -> str:
    deadline = time.monotonic() + MODEL_WAIT_S
    while True:
        run: training_run_pb2.TrainingRun = clients.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=run_name), timeout=UNARY_TIMEOUT_S
        )
        if run.trained_model:
            return run.trained_model
        if time.monotonic() > deadline:
            console.print(f"[red]{run_name} has no trained model after {MODEL_WAIT_S:.0f}s[/]")
            raise typer.Exit(1)
        time.sleep(0.5)


def _train(
    clients: Clients,
    *,
    title: str,
    display_name: str,
    dataset_uri: str,
    epochs: int,
    architecture: str | None = None,
    base_model: str | None = None,
) -> str:
    """Creates a run, follows it to its end, and returns its trained model's name."""
    console.print(Rule(title))
    request = create_request(
        display_name=display_name,
        dataset=dataset_uri,
        epochs=epochs,
        image_size=128,
        architecture=architecture,
        base_model=base_model,
    )
    run = clients.runs.CreateTrainingRun(request, timeout=UNARY_TIMEOUT_S)
    console.print(run_details(run))
    ended = watch_run(clients, run.name, console=console)
    if ended.state != training_run_pb2.TrainingRun.State.SUCCEEDED:
        console.print(run_details(ended))
        raise typer.Exit(1)
    model = _wait_for_model(clients, run.name)
    console.print(f"[green]{run.name} produced {model}[/]")
    return model


@exit_on_rpc_error
def run_demo(data_dir: Path, *, epochs: int, fine_tune_epochs: int) -> None:
    """`raven demo` (cli.stack.demo)."""
    began = time.monotonic()
    try:
        _demo(Settings(), data_dir, epochs=epochs, fine_tune_epochs=fine_tune_epochs)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the stack this demo started is stopped[/]")
        raise typer.Exit(130) from None
    _say(f"demo finished in {time.monotonic() - began:.0f}s")


def _demo(settings: Settings, data_dir: Path, *, epochs: int, fine_tune_epochs: int) -> None:
    with ExitStack() as stack:
        tls = client_tls(settings)
        if devstack.is_serving(settings.training_runs_addr, tls) and devstack.is_serving(
            settings.trained_models_addr, tls
        ):
            _say("using the stack already running (make up)")
            recorded = devstack.recorded_state(data_dir)
            if recorded:
                # The datasets must land where that stack's worker reads.
                settings = settings.model_copy(
                    update={"artifact_root": Path(recorded.artifact_root)}
                )
        else:
            _say(f"starting the stack; logs in {devstack.layout_for(data_dir).logs}")
            try:
                stack.enter_context(devstack.foreground(settings, data_dir, say=_say))
            except devstack.StackError as error:
                console.print(
                    Text.assemble(("error ", "bold red"), str(error)),
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
        artifact_root = settings.resolved_artifact_root()
        with connect(settings) as clients:
            root = _train(
                clients,
                title=f"root model: {ARCHITECTURE} from random weights",
                display_name="demo root",
                dataset_uri=_dataset(artifact_root, "demo-a", seed=0),
                epochs=epochs,
                architecture=ARCHITECTURE,
            )
            tuned = _train(
                clients,
                title=f"fine-tune of {root}",
                display_name="demo fine-tune",
                dataset_uri=_dataset(artifact_root, "demo-b", seed=1),
                epochs=fine_tune_epochs,
                base_model=root,
            )
            console.print(Rule("result"))
            model = clients.models.GetTrainedModel(
                trained_model_pb2.GetTrainedModelRequest(name=tuned), timeout=UNARY_TIMEOUT_S
            )
            console.print(model_details(model))
            console.print(lineage_view(clients, tuned))
