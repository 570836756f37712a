"""The training report (trainer_worker.review.plots, .report, trainer_worker.training_report):
plots that open as images of their size and draw the series, and one HTML page that
embeds everything it shows, escapes what datasets name, and pictures the predictions
the run's evaluation dumped."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from trainer_worker import detections
from trainer_worker.dataset import PreparedDataset
from trainer_worker.outcomes import EpochRecord, TrainingSucceeded
from trainer_worker.protocol import Evaluated
from trainer_worker.review.plots import (
    HEIGHT_PX,
    WIDTH_PX,
    EpochPoint,
    learning_rate_plot,
    loss_plot,
    val_map_plot,
)
from trainer_worker.review.render import PREDICTED_COLOUR, TRUE_COLOUR
from trainer_worker.review.report import (
    DatasetFacts,
    EvaluationFacts,
    Plot,
    SamplePicture,
    TrainingReport,
    render_html,
)
from trainer_worker.training_report import (
    PLOT_FILES,
    REPORT_FILE,
    SAMPLE_PX,
    with_report,
    write_report,
)

# matplotlib's first three cycle colours: C0, C1, C2.
CYCLE = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C))
HOSTILE = '<script>alert("x")</script>'
EPOCHS = [
    EpochPoint(
        epoch=e,
        train={"loss": 2.0 / e, "loss_cls": 1.2 / e, "loss_bbox": 0.8 / e, "lr": 0.01 * e},
        val={"coco/bbox_mAP": 0.1 * e, "coco/bbox_mAP_50": 0.2 * e, "coco/bbox_mAP_75": 0.05 * e},
    )
    for e in (1, 2, 3)
]


def opened(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def near(image: Image.Image, colour: tuple[int, int, int], *, tolerance: int = 12) -> int:
    """Pixels within `tolerance` of `colour` on every channel."""
    pixels = np.asarray(image, dtype=np.int16)
    return int((np.abs(pixels - np.array(colour, dtype=np.int16)) <= tolerance).all(axis=2).sum())


def not_blank(image: Image.Image) -> bool:
    pixels = np.asarray(image)
    return bool((pixels != pixels[0, 0]).any())


@pytest.mark.parametrize("plot", [loss_plot, learning_rate_plot])
def test_train_plots_open_at_their_size_and_draw_the_series(plot: Any) -> None:
    image = opened(plot(EPOCHS))
    assert image.size == (WIDTH_PX, HEIGHT_PX)
    assert not_blank(image)
    assert near(image, CYCLE[0]) > 200, "the first series is drawn"
    smaller = opened(plot(EPOCHS, width_px=400))
    assert smaller.size == (400, round(400 * HEIGHT_PX / WIDTH_PX))


def test_the_loss_plot_draws_every_loss_term_and_not_the_learning_rate() -> None:
    image = opened(loss_plot(EPOCHS))
    # loss, loss_bbox, loss_cls: three lines; lr is no loss (no fourth colour).
    for colour in CYCLE:
        assert near(image, colour) > 100, colour
    assert near(image, (0xD6, 0x27, 0x28)) == 0, "C3 would be a fourth line"


def test_the_map_plot_draws_three_curves_and_skips_cocos_minus_one() -> None:
    image = opened(val_map_plot(EPOCHS, best_epoch=3))
    assert image.size == (WIDTH_PX, HEIGHT_PX)
    for colour in CYCLE:
        assert near(image, colour) > 50, colour
    # An epoch whose split had nothing to evaluate (-1) is no point: an empty plot.
    unmeasured = [EpochPoint(epoch=1, val={"coco/bbox_mAP": -1.0})]
    empty = opened(val_map_plot(unmeasured, best_epoch=1))
    assert not_blank(empty), "it says there were no values"
    assert near(empty, CYCLE[0]) == 0


def facts(classes: tuple[str, ...]) -> DatasetFacts:
    return DatasetFacts(
        fingerprint="ab" * 32,
        classes=classes,
        image_count=10,
        annotation_count=17,
        instances_per_class={c: i + 5 for i, c in enumerate(classes)},
        train_image_count=6,
        val_image_count=2,
        test_image_count=2,
        split_source="seed",
        split_seed=7,
    )


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data", "background"):
                self.urls.append((tag, name, value or ""))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def decoded(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    return base64.b64decode(uri.removeprefix(prefix), validate=True)


def sample_png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(out, format="PNG")
    return out.getvalue()


def test_the_page_embeds_all_it_shows_and_escapes_what_datasets_name() -> None:
    plots = [
        Plot(title=t, png=p(EPOCHS)) for t, p in (("loss", loss_plot), ("lr", learning_rate_plot))
    ]
    samples = [
        SamplePicture(
            group="worst",
            file_name='x" onerror="alert(1).png',
            tp=0,
            fp=2,
            fn=1,
            png=sample_png((255, 0, 0)),
        ),
        SamplePicture(
            group="best", file_name="good.png", tp=3, fp=0, fn=0, png=sample_png((0, 0, 255))
        ),
    ]
    report = TrainingReport(
        title=f"run {HOSTILE}",
        architecture="retinanet_r18_fpn",
        best_epoch=2,
        epochs_trained=3,
        duration_s=12.5,
        device="cpu",
        dataset=facts(("tire", HOSTILE)),
        evaluation=EvaluationFacts(
            split="test",
            epoch=2,
            image_count=2,
            metrics={"coco/bbox_mAP": 0.4567, "coco/bbox_mAP_50": -1.0},
            per_class_ap={"tire": 0.25, HOSTILE: -1.0},
        ),
        plots=plots,
        samples=samples,
    )
    page = render_html(report)
    document = parsed(page)

    assert "script" not in document.tags
    assert HOSTILE not in page and 'x" onerror' not in page
    # Every URL of the page is an embedded picture, and they are the pictures given.
    assert [(tag, name) for tag, name, _ in document.urls] == [("img", "src")] * 4
    assert [decoded(uri) for _, _, uri in document.urls] == [p.png for p in plots] + [
        s.png for s in samples
    ]
    # What is left without the pictures names no other place: no URL, no import.
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page).lower()
    for scheme in ("http:", "https:", "file:", "//", "url(", "@import"):
        assert scheme not in rest, scheme
    assert "default-src 'none'" in page, "the page may load nothing"

    text = " ".join(document.text)
    assert HOSTILE in text, "the class name is shown, as text"
    assert "0.457" in text and "0.250" in text
    assert 'x" onerror="alert(1).png: 0 right, 2 false, 1 missed' in text
    assert "Predictions on the test split" in text


def test_a_page_without_samples_says_why() -> None:
    report = TrainingReport(
        title="run",
        architecture="a",
        best_epoch=1,
        epochs_trained=1,
        duration_s=1.0,
        device="cpu",
        dataset=facts(("tire",)),
        evaluation=EvaluationFacts(
            split="val", epoch=1, image_count=0, metrics={}, per_class_ap={}
        ),
        samples_note="not available",
    )
    document = parsed(render_html(report))
    assert document.urls == []
    assert "not available" in " ".join(document.text)


# The worker's part: a prepared val split of real images and the child's detections dump.
SIZES = ((96, 64), (40, 120), (128, 128))


def prepared_split(tmp_path: Path) -> tuple[PreparedDataset, dict[str, Any]]:
    images, annotations = [], []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        path = tmp_path / "images" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (90, 90, 90)).save(path)
        images.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "area": 300.0,
                "bbox": [5.0, 5.0, 20.0, 15.0],
                "iscrowd": 0,
            }
        )
    truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "tire"}, {"id": 2, "name": HOSTILE}],
    }
    val_path = tmp_path / "val.json"
    val_path.write_text(json.dumps(truth))
    prepared = PreparedDataset(
        annotation_path=val_path,
        image_root=tmp_path / "images",
        train_path=val_path,
        val_path=val_path,
        test_path=None,
        split_path=tmp_path / "split.json",
        classes=("tire", HOSTILE),
        image_count=3,
        annotation_count=3,
        instances_per_class={"tire": 3},
        train_image_count=0,
        val_image_count=3,
        test_image_count=0,
        split_seed=1,
        split_source="seed",
        fingerprint="cd" * 32,
    )
    return prepared, truth


def outcome(*, tested: Evaluated | None = None) -> TrainingSucceeded:
    return TrainingSucceeded(
        artifacts=(),
        best_epoch=2,
        best_metrics={"coco/bbox_mAP": 0.5, "coco/tire_precision": 0.5},
        epochs=tuple(EpochRecord(epoch=e.epoch, train=e.train, val=e.val) for e in EPOCHS),
        epochs_trained=3,
        duration_s=3.0,
        parameter_count=10,
        device="cpu",
        test_evaluation=tested,
        val_image_count=3,
    )


def test_the_worker_writes_plots_and_a_page_with_the_best_epochs_predictions(
    tmp_path: Path,
) -> None:
    prepared, _ = prepared_split(tmp_path)
    work_dir, artifact_dir = tmp_path / "work", tmp_path / "model"
    dumped = detections.of_epoch(work_dir, "val", 2)
    dumped.parent.mkdir(parents=True)
    # Image 1 found, image 2 found with a spurious box, image 3 missed.
    dumped.write_text(
        json.dumps(
            [
                {"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 15.0], "score": 0.9},
                {"image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 15.0], "score": 0.8},
                {"image_id": 2, "category_id": 2, "bbox": [20.0, 60.0, 10.0, 10.0], "score": 0.7},
            ]
        )
    )
    # Another epoch's dump is not the kept weights'.
    detections.of_epoch(work_dir, "val", 3).write_text("[]")

    files = write_report(
        outcome(),
        prepared=prepared,
        title="r",
        architecture="a",
        work_dir=work_dir,
        artifact_dir=artifact_dir,
    )

    assert [(f.kind, f.name) for f in files] == [("plot", n) for n, _ in PLOT_FILES] + [
        ("report", REPORT_FILE)
    ]
    for f in files:
        assert f.path.parent == artifact_dir and f.path.name == f.name
        content = f.path.read_bytes()
        assert (f.size_bytes, f.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    for f in files[:-1]:
        assert opened(f.path.read_bytes()).size == (WIDTH_PX, HEIGHT_PX)

    document = parsed(files[-1].path.read_text(encoding="utf-8"))
    pictures = [decoded(uri) for _, _, uri in document.urls]
    assert pictures[:3] == [f.path.read_bytes() for f in files[:-1]]
    samples = [opened(p) for p in pictures[3:]]
    text = " ".join(document.text)
    assert "3.png: 0 right, 0 false, 1 missed" in text
    assert "2.png: 1 right, 1 false, 0 missed" in text
    assert "1.png: 1 right, 0 false, 0 missed" in text
    # Most errors first, ties by the lower id (2, 3), then the rest: none twice.
    order = [SIZES[1], SIZES[2], SIZES[0]]
    scales = [min(3.0, SAMPLE_PX / max(size)) for size in order]
    assert [s.size for s in samples] == [
        (round(w * k), round(h * k)) for (w, h), k in zip(order, scales, strict=True)
    ]
    assert all(near(s, TRUE_COLOUR, tolerance=0) > 0 for s in samples), "true boxes drawn"
    assert near(samples[0], PREDICTED_COLOUR, tolerance=0) > 0, "predictions drawn"
    assert near(samples[1], PREDICTED_COLOUR, tolerance=0) == 0, "image 3 had none"
    assert HOSTILE in text


def test_without_the_kept_weights_detections_the_page_says_so(tmp_path: Path) -> None:
    prepared, _ = prepared_split(tmp_path)
    work_dir = tmp_path / "work"
    # Only a later epoch's dump: the best epoch trained in an earlier attempt.
    detections.of_epoch(work_dir, "val", 3).parent.mkdir(parents=True)
    detections.of_epoch(work_dir, "val", 3).write_text("[]")
    tested = Evaluated(epoch=2, metrics={"coco/bbox_mAP": 0.3}, split="test", image_count=4)
    files = write_report(
        outcome(tested=tested),
        prepared=prepared,
        title="r",
        architecture="a",
        work_dir=work_dir,
        artifact_dir=tmp_path / "model",
    )
    document = parsed(files[-1].path.read_text(encoding="utf-8"))
    assert len(document.urls) == 3, "the plots only"
    text = " ".join(document.text)
    assert "test split's detections of the kept weights are not available" in text
    assert "test split, 4 images, epoch 2" in text


def test_a_dump_that_cannot_be_read_leaves_the_rest_of_the_page(tmp_path: Path) -> None:
    prepared, _ = prepared_split(tmp_path)
    work_dir = tmp_path / "work"
    dumped = detections.of_epoch(work_dir, "val", 2)
    dumped.parent.mkdir(parents=True)
    dumped.write_text('[{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]')
    files = write_report(
        outcome(),
        prepared=prepared,
        title="r",
        architecture="a",
        work_dir=work_dir,
        artifact_dir=tmp_path / "model",
    )
    document = parsed(files[-1].path.read_text(encoding="utf-8"))
    assert len(document.urls) == 3, "the plots"
    assert "detections of the kept weights could not be read" in " ".join(document.text)


async def test_a_report_that_cannot_be_rendered_leaves_the_model_whole(tmp_path: Path) -> None:
    prepared, truth = prepared_split(tmp_path)
    # A ground truth the pictures cannot be drawn from: no annotations.
    prepared.val_path.write_text(json.dumps({**truth, "annotations": None}))
    work_dir = tmp_path / "work"
    dumped = detections.of_epoch(work_dir, "val", 2)
    dumped.parent.mkdir(parents=True)
    dumped.write_text("[]")
    notices: list[tuple[str, str]] = []

    async def notice(code: str, message: str) -> None:
        notices.append((code, message))

    before = outcome()
    after = await with_report(
        before,
        prepared=prepared,
        title="r",
        architecture="a",
        work_dir=work_dir,
        artifact_dir=tmp_path / "model",
        notice=notice,
    )
    assert after is before
    assert [code for code, _ in notices] == ["report_not_rendered"]
    assert str(tmp_path) not in notices[0][1]

    # Rendered, the report's files join the model's.
    prepared.val_path.write_text(json.dumps(truth))
    rendered = await with_report(
        before,
        prepared=prepared,
        title="r",
        architecture="a",
        work_dir=work_dir,
        artifact_dir=tmp_path / "model",
        notice=notice,
    )
    assert [a.kind for a in rendered.artifacts] == ["plot"] * 3 + ["report"]
    assert len(notices) == 1


async def test_a_report_that_cannot_be_written_is_a_storage_fault(tmp_path: Path) -> None:
    prepared, _ = prepared_split(tmp_path)
    # The model's folder is a file: writing under it fails as a full disk would.
    blocked = tmp_path / "model"
    blocked.write_text("")

    async def notice(code: str, message: str) -> None:
        raise AssertionError("a storage fault is no notice")

    with pytest.raises(OSError):
        await with_report(
            outcome(),
            prepared=prepared,
            title="r",
            architecture="a",
            work_dir=tmp_path / "work",
            artifact_dir=blocked,
            notice=notice,
        )
