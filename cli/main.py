"""The `raven` command: `python -m cli.main --help`."""

from __future__ import annotations

import typer

from cli import audit, demo, models, runs, stack

app = typer.Typer(
    name="raven",
    help="Raven training backbone: training runs, trained models and the local stack.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(runs.app, name="runs")
app.add_typer(models.app, name="models")
app.add_typer(stack.app, name="stack")
app.add_typer(audit.app, name="audit")
app.command()(demo.demo)
app.command()(audit.certs)

if __name__ == "__main__":
    app()
