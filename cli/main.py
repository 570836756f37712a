"""The `raven` command: `python -m cli.main --help`.

Starting it loads what a command needs and no more: the local stack's and the demo's
modules (embedded servers, the database driver) only when those commands run."""

from __future__ import annotations

import typer

from cli import audit, models, runs, stack
from cli.architectures import architectures

app = typer.Typer(
    name="raven",
    help="Raven training backbone: training runs, trained models and the local stack.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
app.add_typer(runs.app, name="runs")
app.add_typer(models.app, name="models")
app.add_typer(stack.app, name="stack")
app.add_typer(audit.app, name="audit")
app.command()(architectures)
app.command()(stack.demo)
app.command()(audit.certs)

if __name__ == "__main__":
    app()
