"""`raven architectures`: the catalog and what an unset spec field becomes."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from cli.client import UNARY_TIMEOUT_S, connect, exit_on_rpc_error
from cli.output import Format, OutputOption, emit
from shared.proto.raven.training.v1 import training_run_pb2

Spec = training_run_pb2.TrainingSpec


def _recipe(spec: Spec) -> str:
    optimizer = Spec.Optimizer.Name(spec.optimizer).lower()
    return f"{optimizer}, lr {spec.learning_rate:g}, frozen stages {spec.frozen_stages}"


def _defaults(spec: Spec) -> Text:
    shown = []
    for field, value in spec.ListFields():
        if field.enum_type is not None:
            value = field.enum_type.values_by_number[value].name.lower()
        shown.append(f"{field.name}={value}")
    return Text("defaults: " + ", ".join(shown))


def architectures_view(response: training_run_pb2.ListArchitecturesResponse) -> RenderableType:
    table = Table(
        Column("architecture", no_wrap=True),
        "family",
        Column("depth", justify="right"),
        "from random weights",
        "fine-tuning",
        box=box.SIMPLE_HEAD,
    )
    for arch in response.architectures:
        table.add_row(
            arch.key,
            arch.family,
            str(arch.backbone_depth or ""),
            _recipe(arch.from_scratch),
            _recipe(arch.fine_tune),
        )
    return Group(table, _defaults(response.defaults))


@exit_on_rpc_error
def architectures(output: OutputOption = Format.table) -> None:
    """The architectures a run can train, their recipes, and the other defaults."""
    with connect() as clients:
        response = clients.runs.ListArchitectures(
            training_run_pb2.ListArchitecturesRequest(), timeout=UNARY_TIMEOUT_S
        )
    emit(response, architectures_view, output)
