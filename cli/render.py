"""Rich renderings of runs, events and models. Pure functions of protobuf messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text
from rich.tree import Tree

from cli.fitting import Fitting
from shared.metrics import MAP, MAP_50, MAP_75
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2, training_run_pb2

State = training_run_pb2.TrainingRun.State
TERMINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})

_STATE_STYLES: dict[int, str] = {
    State.QUEUED: "dim",
    State.PREPARING: "cyan",
    State.RUNNING: "blue",
    State.SUCCEEDED: "bold green",
    State.FAILED: "bold red",
    State.CANCELLING: "yellow",
    State.CANCELLED: "yellow",
}


def state_text(state: int) -> Text:
    return Text(State.Name(state), style=_STATE_STYLES.get(state, ""))


def timestamp(value: Timestamp, *, short: bool = False) -> str:
    if not value.seconds and not value.nanos:
        return ""
    moment: datetime = value.ToDatetime(tzinfo=UTC)
    return moment.astimezone().strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def duration(value: Duration) -> str:
    seconds: float = value.ToTimedelta().total_seconds()
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def map_value(evaluation: common_pb2.Evaluation) -> str:
    """coco/bbox_mAP, or a dash when there is none (an untrained model detects nothing)."""
    value = evaluation.metrics.get(MAP)
    return "—" if value is None else f"{value:.3f}"


def metrics_text(evaluation: common_pb2.Evaluation) -> str:
    short = {MAP: "mAP", MAP_50: "mAP50", MAP_75: "mAP75"}
    parts = [f"{label} {evaluation.metrics[key]:.3f}" for key, label in short.items()
             if key in evaluation.metrics]  # fmt: skip
    return ", ".join(parts) or "no mAP yet (no detections)"


def _fields(rows: list[tuple[str, RenderableType | str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        if value:
            # Values are data, never markup: "[x, y, w, h]" in a message stays as it is.
            table.add_row(label, Text(value) if isinstance(value, str) else value)
    return table


def _artifacts(artifacts: list[common_pb2.Artifact]) -> str:
    return "\n".join(f"{a.kind}: {a.uri} ({a.size_bytes} B)" for a in artifacts)


def progress_text(progress: training_run_pb2.Progress) -> str:
    if not progress.max_epochs:
        return ""
    text = f"epoch {progress.epoch}/{progress.max_epochs}"
    if progress.max_iterations:
        text += f", iteration {progress.iteration}/{progress.max_iterations}"
    if progress.loss:
        text += f", loss {progress.loss:.4f}"
    return text


def _evaluation(run: training_run_pb2.TrainingRun, field: str) -> str:
    if not run.HasField(field):
        return ""
    evaluation: common_pb2.Evaluation = getattr(run, field)
    return f"epoch {evaluation.epoch}: {metrics_text(evaluation)}"


def run_details(run: training_run_pb2.TrainingRun) -> Table:
    spec = run.spec
    settings = ", ".join(
        f"{field.name}={field.enum_type.values_by_number[value].name if field.enum_type else value}"
        for field, value in spec.ListFields()
        if field.name not in ("dataset_uri", "image_root", "architecture")
    )
    failure = f"{run.failure.reason}: {run.failure.message}" if run.failure.reason else ""
    return _fields([
        ("name", run.name),
        ("display name", run.display_name),
        ("state", state_text(run.state)),
        ("architecture", spec.architecture),
        ("dataset", spec.dataset_uri),
        ("settings", settings),
        ("base model", run.base_model),
        ("trained model", run.trained_model),
        ("progress", progress_text(run.progress)),
        ("latest eval", _evaluation(run, "latest_evaluation")),
        ("best eval", _evaluation(run, "best_evaluation")),
        ("test eval", _evaluation(run, "test_evaluation")),
        ("failure", failure),
        ("attempt", str(run.attempt) if run.attempt > 1 else ""),
        ("creator", run.creator),
        ("created", timestamp(run.create_time)),
        ("started", timestamp(run.start_time)),
        ("ended", timestamp(run.end_time)),
        ("artifacts", _artifacts(list(run.artifacts))),
    ])  # fmt: skip


def next_page(table: Table, token: str) -> RenderableType:
    """A list's table (as rows of lines where it does not fit), and how to ask for the
    next page when there is one."""
    if not token:
        return Fitting(table)
    return Group(Fitting(table), Text(f"next page: --page-token {token}"))


def events_text(events: training_run_pb2.ListTrainingRunEventsResponse) -> RenderableType:
    return Group(*(event_text(e) for e in events.events))


def runs_table(runs: list[training_run_pb2.TrainingRun], page_token: str = "") -> RenderableType:
    # The id is what users copy into the next command: never truncated or wrapped.
    table = Table(
        Column("id", no_wrap=True),
        Column("display name", min_width=12),
        Column("state", no_wrap=True),
        Column("mAP", no_wrap=True),
        Column("created", min_width=5),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    for run in runs:
        table.add_row(
            run.name.removeprefix("trainingRuns/"),
            run.display_name,
            state_text(run.state),
            map_value(
                run.best_evaluation if run.HasField("best_evaluation") else run.latest_evaluation
            ),
            timestamp(run.create_time, short=True),
        )
    return next_page(table, page_token)


def event_text(event: training_run_pb2.TrainingRunEvent) -> Text:
    """One line per event, for `runs events` and the live watch."""
    head = Text(f"#{event.sequence:<4} {timestamp(event.time)}  ", style="dim")
    kind = event.WhichOneof("payload")
    if kind == "state_changed":
        change = event.state_changed
        body = Text.assemble(
            *((state_text(change.from_state), " → ") if change.from_state else ()),
            state_text(change.to_state),
            f"  {change.reason}" if change.reason else "",
            f": {change.message}" if change.message else "",
        )  # fmt: skip
    elif kind == "progress":
        body = Text(progress_text(event.progress))
    elif kind == "evaluation":
        body = Text(f"epoch {event.evaluation.epoch} {event.evaluation.split}: ")
        body.append(metrics_text(event.evaluation))
    elif kind == "dataset_prepared":
        body = Text(dataset_text(event.dataset_prepared))
    elif kind == "notice":
        body = Text(f"notice {event.notice.code}: {event.notice.message}", style="yellow")
    else:
        body = Text("(empty event)", style="dim")
    if event.actor:
        body.append(f"  [{event.actor}]", style="dim")
    return head + body


def dataset_text(dataset: common_pb2.DatasetSummary) -> str:
    return (
        f"dataset: {dataset.image_count} images, {dataset.annotation_count} boxes, "
        f"classes {', '.join(dataset.classes)}; split {dataset.train_image_count} train / "
        f"{dataset.val_image_count} val / {dataset.test_image_count} test"
        + (" (the dataset's own)" if dataset.split_source == "dataset" else "")
    )


def model_details(model: trained_model_pb2.TrainedModel) -> Table:
    facts = model.facts
    trained = (
        f"{facts.epochs_trained} epochs in {duration(facts.duration)} on {facts.device}, "
        f"best epoch {facts.best_epoch}, {facts.parameter_count:,} parameters"
        if facts.epochs_trained
        else ""
    )
    publication = (
        f"{model.publication.channel} since {timestamp(model.publication.publish_time)}"
        if model.publication.published
        else ""
    )
    return _fields([
        ("name", model.name),
        ("display name", model.display_name),
        ("architecture", model.architecture),
        ("classes", ", ".join(model.classes)),
        ("training run", model.training_run),
        ("base model", model.base_model),
        ("dataset", model.dataset_uri),
        ("evaluation", _model_evaluation(model, "evaluation")),
        ("val evaluation", _model_evaluation(model, "val_evaluation")
         if model.evaluation.split == "test" else ""),
        ("training", trained),
        ("published", publication),
        ("created", timestamp(model.create_time)),
        ("artifacts", _artifacts(list(model.artifacts))),
    ])  # fmt: skip


def _model_evaluation(model: trained_model_pb2.TrainedModel, field: str) -> str:
    if not model.HasField(field):
        return ""
    evaluation: common_pb2.Evaluation = getattr(model, field)
    return f"{evaluation.split or 'val'}, epoch {evaluation.epoch}: {metrics_text(evaluation)}"


def models_table(
    models: list[trained_model_pb2.TrainedModel], page_token: str = ""
) -> RenderableType:
    table = Table(
        Column("id", no_wrap=True),
        "display name",
        "architecture",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("base model")
    table.add_column("mAP", no_wrap=True)
    table.add_column("published")
    for model in models:
        table.add_row(
            model.name.removeprefix("trainedModels/"),
            model.display_name,
            model.architecture,
            model.base_model.removeprefix("trainedModels/"),
            map_value(model.evaluation),
            model.publication.channel if model.publication.published else "",
        )
    return next_page(table, page_token)


Node = trained_model_pb2.TrainedModelLineage.LineageNode


def _node_label(node: Node, *, current: str) -> Text:
    label = Text(node.trained_model, style="bold" if node.trained_model == current else "")
    if node.display_name:
        label.append(f"  {node.display_name}")
    label.append(f"  mAP {node.bbox_map:.3f}" if node.HasField("bbox_map") else "  mAP —")
    if node.training_run:
        label.append(f"  ({node.training_run})", style="dim")
    return label


def lineage_tree(lineage: trained_model_pb2.TrainedModelLineage, name: str) -> RenderableType:
    """Root first, down to the model, then its descendants under it."""
    if not lineage.ancestors:
        return Text(f"{name}: no lineage")
    chain = list(reversed(lineage.ancestors))
    tree = Tree(_node_label(chain[0], current=name))
    branch = tree
    branches: dict[str, Tree] = {chain[0].trained_model: tree}
    for node in chain[1:]:
        branch = branch.add(_node_label(node, current=name))
        branches[node.trained_model] = branch
    for node in lineage.descendants:
        parent = branches.get(node.base_model, branch)
        branches[node.trained_model] = parent.add(_node_label(node, current=name))
    return Group(Text("lineage (root first)", style="bold"), tree)


def lineage_from_models(
    models: list[trained_model_pb2.TrainedModel],
) -> trained_model_pb2.TrainedModelLineage:
    """A lineage built by walking base_model links (model first), for servers without the RPC."""
    return trained_model_pb2.TrainedModelLineage(
        ancestors=[
            Node(
                trained_model=m.name,
                display_name=m.display_name,
                base_model=m.base_model,
                training_run=m.training_run,
                dataset_fingerprint=m.dataset_fingerprint,
                depth=depth,
                **({"bbox_map": m.evaluation.metrics[MAP]} if MAP in m.evaluation.metrics else {}),
            )
            for depth, m in enumerate(models)
        ]
    )
