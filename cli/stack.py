"""`raven stack up|down|status`: the local stack in the background (`make up`, `make down`),
and `raven demo`. Their modules (embedded servers, the database driver) load only when one
of these commands runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shared.paths import DEFAULT_DATA_DIR

app = typer.Typer(
    help="The local stack: infrastructure, both services and a worker.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
# `raven stack status` when something is not running or not serving (as systemctl's 3).
NOT_RUNNING = 3
console = Console()

DataDir = Annotated[
    Path, typer.Option(help="Embedded databases, logs, pid files.", file_okay=False)
]


def _say(message: str) -> None:
    console.print(message, highlight=False)


@app.command()
def up(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Start what is not running yet, in the background."""
    from cli import devstack
    from shared.settings import Settings

    settings = Settings()
    layout = devstack.layout_for(data_dir)
    try:
        _, started, found = devstack.start(settings, data_dir, detached=True, say=_say)
    except devstack.StackError as error:
        console.print(
            Text.assemble(("error ", "bold red"), str(error)), highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    if not started:
        console.print("already running", style="bold")
    elif found:
        console.print(f"was already running: {', '.join(c.name for c in found)}")
    console.print(f"TrainingRunService   {settings.training_runs_addr}", highlight=False)
    console.print(f"TrainedModelService  {settings.trained_models_addr}", highlight=False)
    for component in devstack.COMPONENTS:
        where = _metrics_url(component.metrics_address(settings))
        console.print(f"{component.name + ' metrics':<21}{where}", highlight=False)
    console.print(f"logs                 {layout.logs}", highlight=False)
    console.print("stop with            make down   (or: raven stack down)", highlight=False)


@app.command()
def down(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Stop the services, the worker and the embedded servers."""
    from cli import devstack

    stopped = devstack.down(data_dir)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """What runs, where; exits 3 when a part is not running or not serving."""
    from cli import devstack
    from shared.settings import Settings

    settings = Settings()
    healthy = True
    table = Table("component", "pid", "state", "address", "/metrics")
    for row in devstack.status(settings, data_dir):
        healthy = healthy and row.pid is not None and row.serving is not False
        if row.pid is None:
            state = "[dim]stopped[/]"
        elif row.serving is None:
            state = "[green]running[/]"
        else:
            state = "[green]SERVING[/]" if row.serving else "[yellow]not serving[/]"
        table.add_row(
            row.component.name,
            str(row.pid or ""),
            state,
            row.component.address(settings) or "",
            row.component.metrics_address(settings) or "off",
        )
    for name, pid in devstack.embedded_pids(data_dir).items():
        table.add_row(
            f"{name} (embedded)",
            str(pid or ""),
            "[green]running[/]" if pid else "[dim]stopped[/]",
            "",
            "",
        )
    console.print(table)
    recorded = devstack.recorded_state(data_dir)
    if recorded:
        console.print(f"database  {recorded.database_url}", highlight=False)
        console.print(f"nats      {recorded.nats_url}", highlight=False)
        console.print(f"artifacts {recorded.artifact_root}", highlight=False)
    console.print(f"logs      {devstack.layout_for(data_dir).logs}", highlight=False)
    if not healthy:
        raise typer.Exit(NOT_RUNNING)


def _metrics_url(address: str | None) -> str:
    return f"http://{address}/metrics" if address else "off"


def demo(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of the root run.")] = 6,
    fine_tune_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the fine-tune.")] = 3,
) -> None:
    """Start the stack, train a root model, fine-tune it, watch both live (`make run`)."""
    from cli.demo import run_demo

    run_demo(data_dir, epochs=epochs, fine_tune_epochs=fine_tune_epochs)
