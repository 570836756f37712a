"""The product of a training service is a model that detects: with the server's defaults.

Only the dataset, the architecture, the epochs, the image size and a declared seed are set:
everything else is the recipe the server fills in. The bars are on validation images the model never trained
on; the fine-tunes train on new images drawn with other seeds.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from shared.metrics import MAP_50
from shared.proto.raven.training.v1 import (
    trained_model_pb2,
    training_run_pb2,
    training_run_pb2_grpc,
)
from shared.settings import Settings
from tests.cli import raven
from tests.training import local_dataset, model_of, watch_to_the_end, worker_fixture

TrainingRun = training_run_pb2.TrainingRun
Spec = training_run_pb2.TrainingSpec
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ARCHITECTURE = "rtmdet_tiny"
IMAGE_SIZE = 128
ROOT_IMAGES, ROOT_EPOCHS = 120, 6
CLASSES = ("dump", "tire")
# The bar of the issue that asked for learning: val mAP_50 from random weights.
ROOT_MAP_50 = 0.5
# A training seed that learns both classes of dataset seed 11 (docs/training.md: seed 0 did
# with earlier library builds and stalls on "tire" with the current ones). With a drawn seed
# some runs still leave one class unlearnt after six epochs (a stalled run is in that table
# too): the test proves learning for a declared seed, and its failure message names it.
TRAINING_SEED = 1


worker = worker_fixture("learning-worker")


def dataset(settings: Settings, name: str, *, images: int, seed: int, classes=CLASSES) -> str:
    return local_dataset(settings, name, images=images, size=IMAGE_SIZE, classes=classes, seed=seed)


async def train(runs, dataset_uri: str, *, epochs: int, base_model: str = "") -> TrainingRun:
    """A run with only what the issue allows set; its end, as GetTrainingRun shows it."""
    run = await runs.CreateTrainingRun(
        training_run_pb2.CreateTrainingRunRequest(
            training_run=TrainingRun(
                display_name=f"learning {dataset_uri}",
                base_model=base_model,
                spec=Spec(
                    dataset_uri=dataset_uri,
                    architecture="" if base_model else ARCHITECTURE,
                    epochs=epochs,
                    image_size=IMAGE_SIZE,
                    seed=TRAINING_SEED,
                ),
            )
        )
    )
    await asyncio.wait_for(watch_to_the_end(runs, run.name), 420)
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.state == TrainingRun.SUCCEEDED, finished.failure
    return finished


async def val_series(runs, run: TrainingRun, key: str) -> list[float]:
    metrics = await runs.GetTrainingRunMetrics(
        training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    )
    return [epoch.val.get(key, 0.0) for epoch in metrics.epochs]


async def all_events(runs, run: TrainingRun) -> list[training_run_pb2.TrainingRunEvent]:
    events: list[training_run_pb2.TrainingRunEvent] = []
    token = ""
    while True:
        page = await runs.ListTrainingRunEvents(
            training_run_pb2.ListTrainingRunEventsRequest(name=run.name, page_token=token)
        )
        events.extend(page.events)
        if not (token := page.next_page_token):
            return events


@pytest.fixture(scope="module")
async def root(
    runs_channel, trained_models, worker, settings: Settings
) -> tuple[TrainingRun, list[float]]:
    """The root run; the registry runs too, so that its model is registered."""
    runs = training_run_pb2_grpc.TrainingRunServiceStub(runs_channel)
    uri = dataset(settings, "learning-root", images=ROOT_IMAGES, seed=11)
    run = await train(runs, uri, epochs=ROOT_EPOCHS)
    return run, await val_series(runs, run, MAP_50)


async def test_the_defaults_learn_from_random_weights(root) -> None:
    run, map_50 = root
    # The server's recipe for random weights, recorded on the run.
    assert run.spec.optimizer == Spec.ADAMW and run.spec.frozen_stages == -1
    assert len(map_50) == ROOT_EPOCHS
    assert max(map_50) >= ROOT_MAP_50, f"val mAP_50 per epoch: {map_50}, seed {run.spec.seed}"
    assert map_50[-1] >= ROOT_MAP_50 * 0.9, f"it stays learnt: {map_50}"
    assert map_50[-1] > map_50[0] + 0.3, f"it rises: {map_50}"


async def test_a_fine_tune_on_new_images_starts_where_the_root_ended(
    runs, root, settings: Settings
) -> None:
    run, root_map_50 = root
    base = await model_of(runs, run.name)
    uri = dataset(settings, "learning-tune", images=48, seed=12)

    tuned = await train(runs, uri, epochs=2, base_model=base)
    tuned_map_50 = await val_series(runs, tuned, MAP_50)

    assert tuned.spec.architecture == ARCHITECTURE and tuned.spec.frozen_stages == 1
    # load_from carried the weights: its first epoch is far above the root's first.
    assert tuned_map_50[0] >= root_map_50[0] + 0.3, (tuned_map_50, root_map_50)
    assert tuned_map_50[0] >= 0.5 * max(root_map_50), (tuned_map_50, root_map_50)


async def test_a_fine_tune_with_one_more_class_keeps_the_old_ones(
    runs, models, root, settings: Settings
) -> None:
    run, root_map_50 = root
    base = await model_of(runs, run.name)
    classes = (*CLASSES, "barrel")
    uri = dataset(settings, "learning-extend", images=72, seed=13, classes=classes)

    tuned = await train(runs, uri, epochs=3, base_model=base)

    payloads = [(e.WhichOneof("payload"), e) for e in await all_events(runs, tuned)]
    assert "head_reinitialised" in [e.notice.code for kind, e in payloads if kind == "notice"]
    model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=await model_of(runs, tuned.name))
    )
    assert list(model.classes) == list(classes)
    evaluations = {e.evaluation.epoch: e.evaluation for kind, e in payloads if kind == "evaluation"}
    root_first = next(
        e.evaluation
        for e in await all_events(runs, run)
        if e.WhichOneof("payload") == "evaluation" and e.evaluation.epoch == 1
    )
    first, last = evaluations[1], evaluations[max(evaluations)]
    # Only the head started over: the old classes are found from the first epoch on, better
    # than the root found them after its first epoch, and are still found at the end.
    for name in CLASSES:
        assert first.per_class_ap[name] > root_first.per_class_ap.get(name, 0.0) + 0.03, (
            dict(first.per_class_ap),
            dict(root_first.per_class_ap),
        )
        assert last.per_class_ap[name] > 0.05, dict(last.per_class_ap)
    assert first.metrics[MAP_50] > root_map_50[0] + 0.1, (dict(first.metrics), root_map_50)
    assert last.per_class_ap["barrel"] > 0.0, "the new class is being learnt"


async def _evaluated(
    models, runs, model: str, dataset_uri: str
) -> trained_model_pb2.ModelEvaluation:
    started = await models.EvaluateTrainedModel(
        trained_model_pb2.EvaluateTrainedModelRequest(trained_model=model, dataset_uri=dataset_uri)
    )
    await asyncio.wait_for(watch_to_the_end(runs, started.job), 300)
    evaluation = await models.GetModelEvaluation(
        trained_model_pb2.GetModelEvaluationRequest(name=started.name)
    )
    assert evaluation.state == TrainingRun.SUCCEEDED, evaluation.failure
    return evaluation


async def test_two_models_judged_on_the_same_held_out_images_and_only_the_better_published(
    runs, models, root, settings: Settings, pki, training_runs, trained_models, tmp_path
) -> None:
    """What a person does with the API and the CLI: evaluate two models on images neither
    trained on, compare them, look at what each gets wrong, publish only the better."""
    run, _ = root
    good = await model_of(runs, run.name)
    weak_run = await train(runs, dataset(settings, "learning-weak", images=24, seed=14), epochs=1)
    weak = await model_of(runs, weak_run.name)
    # Held-out images of another size than the training images.
    held_out = local_dataset(
        settings, "learning-held-out", images=24, size=160, classes=CLASSES, seed=15
    )

    judged = {model: await _evaluated(models, runs, model, held_out) for model in (good, weak)}

    fingerprints = {e.dataset_fingerprint for e in judged.values()}
    images = {e.review.images_fingerprint for e in judged.values()}
    assert len(fingerprints) == 1 and len(images) == 1 and judged[good].image_count == 24
    good_map, weak_map = (judged[m].evaluation.metrics[MAP_50] for m in (good, weak))
    assert good_map >= 0.4 and good_map > weak_map + 0.2, (good_map, weak_map)
    # What each gets wrong: the weak model misses more objects, and both name their worst image.
    missed = {
        m: sum(c.false_negatives for c in judged[m].review.class_counts) for m in (good, weak)
    }
    assert missed[weak] > missed[good], missed
    for evaluation in judged.values():
        assert [s.rank for s in evaluation.review.samples][:1] == ["worst"]

    (fingerprint,) = fingerprints
    comparison = await models.CompareTrainedModels(
        trained_model_pb2.CompareTrainedModelsRequest(
            trained_models=[good, weak], dataset_fingerprint=fingerprint, split="all"
        )
    )
    assert [r.trained_model for r in comparison.rows] == [good, weak]
    assert comparison.rows[0].values[MAP_50] == pytest.approx(good_map)
    shown = await raven(
        pki, training_runs, trained_models,
        "models", "compare", good, weak, "--dataset", fingerprint, "--split", "all",
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    row = next(line.split() for line in shown.output.splitlines() if line.split()[:1] == [MAP_50])
    assert row[1:] == [f"{good_map:.3f}", f"{weak_map:.3f}"], shown.output
    worst = judged[weak].review.samples[0].artifact
    fetched = await raven(
        pki, training_runs, trained_models,
        "models", "download", judged[weak].name, worst, "--out", str(tmp_path),
    )  # fmt: skip
    assert fetched.exit_code == 0, fetched.output
    assert (tmp_path / worst).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    channel = "learning-production"
    first = await raven(
        pki, training_runs, trained_models,
        "models", "publish", weak, "--channel", channel, "--beat-incumbent",
    )  # fmt: skip
    assert first.exit_code == 0, f"an empty channel has no incumbent to beat: {first.output}"
    published = await raven(
        pki, training_runs, trained_models,
        "models", "publish", good, "--channel", channel, "--beat-incumbent",
        "--incumbent-metric", MAP_50,
    )  # fmt: skip
    assert published.exit_code == 0, published.output
    assert "against the incumbent's" in published.output
    with pytest.raises(grpc.aio.AioRpcError) as back:
        await models.PublishTrainedModel(
            trained_model_pb2.PublishTrainedModelRequest(
                name=weak, channel=channel, beat_incumbent=True, incumbent_metric=MAP_50
            )
        )
    assert back.value.code() == grpc.StatusCode.FAILED_PRECONDITION, back.value.details()
    assert MAP_50 in back.value.details()
    history = await models.ListPublicationEvents(
        trained_model_pb2.ListPublicationEventsRequest(channel=channel, page_size=1)
    )
    comparison_record = history.events[0].incumbent_comparison
    assert history.events[0].trained_model == good
    assert {comparison_record.candidate_evaluation, comparison_record.incumbent_evaluation} == {
        judged[good].name,
        judged[weak].name,
    }


async def test_the_cli_shows_a_runs_metrics_and_fetches_its_report(
    root, pki, training_runs, trained_models, tmp_path
) -> None:
    run, _ = root
    shown = await raven(pki, training_runs, trained_models, "runs", "metrics", run.name)
    assert shown.exit_code == 0, shown.output
    rows = [line.split() for line in shown.output.splitlines() if line.split()[:1] != []]
    epochs = [row[0] for row in rows if row[0].isdigit() and len(row) > 4]
    assert epochs == [str(e) for e in range(1, ROOT_EPOCHS + 1)], shown.output
    assert "loss_cls" in shown.output and "epoch" in shown.output.splitlines()[-1] + shown.output
    assert "⠀" in shown.output or any("\u2800" <= ch <= "\u28ff" for ch in shown.output)

    fetched = await raven(
        pki, training_runs, trained_models, "runs", "report", run.name, "--out", str(tmp_path)
    )
    assert fetched.exit_code == 0, fetched.output
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page
