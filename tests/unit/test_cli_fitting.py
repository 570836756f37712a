"""Lists in a narrow terminal: no value cut, no column dropped, brackets kept."""

from __future__ import annotations

from rich.console import Console

from cli.render import models_table, runs_table
from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2

RUN_ID = "dd76ed03-258b-4c3e-9a1e-0123456789ab"


def _shown(renderable, width: int) -> str:
    console = Console(width=width, record=True, color_system=None, markup=False)
    console.print(renderable)
    return console.export_text()


def _run() -> training_run_pb2.TrainingRun:
    run = training_run_pb2.TrainingRun(
        name=f"trainingRuns/{RUN_ID}",
        display_name="north sites [spring]",
        state=training_run_pb2.TrainingRun.SUCCEEDED,
    )
    run.best_evaluation.metrics["coco/bbox_mAP"] = 0.512
    run.create_time.FromSeconds(1_800_000_000)
    return run


def test_a_wide_terminal_gets_a_table() -> None:
    text = _shown(runs_table([_run()]), 160)
    header = next(line for line in text.splitlines() if "display name" in line)
    assert header.split() == ["id", "display", "name", "state", "mAP", "created"]
    assert RUN_ID in text and "north sites [spring]" in text and "SUCCEEDED" in text


def test_a_narrow_terminal_gets_every_value_whole() -> None:
    for width in (60, 40):
        text = _shown(runs_table([_run(), _run()], "next-token"), width)
        assert "…" not in text
        assert text.count(RUN_ID) == 2
        assert text.count("display name: north sites [spring]") == 2
        assert text.count("state: SUCCEEDED") == 2 and text.count("mAP: 0.512") == 2
        assert "--page-token next-token" in text


def test_models_keep_their_columns_at_sixty() -> None:
    model = trained_model_pb2.TrainedModel(
        name=f"trainedModels/{RUN_ID}",
        display_name="north",
        architecture="retinanet_r18_fpn",
        base_model="trainedModels/aa76ed03-258b-4c3e-9a1e-0123456789ab",
    )
    text = _shown(models_table([model]), 60)
    assert "architecture: retinanet_r18_fpn" in text
    assert "base model: aa76ed03-258b-4c3e-9a1e-0123456789ab" in text
